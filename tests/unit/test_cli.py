"""The command line without servers: options declared once, globals anywhere, exit codes."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from tidegate import errors
from tidegate.cli.commands import COMMANDS, Command
from tidegate.cli.main import load_handler, main
from tidegate.cli.options import GLOBAL, settings_from
from tidegate.cli.parser import build_parser
from tidegate.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> tuple[object, Command]:
    args = build_parser().parse_args(argv)
    return args, args.command_spec


@pytest.mark.parametrize(
    "argv",
    [
        ("--data-dir", "/tmp/d", "executor", "--slots", "3"),
        ("executor", "--slots", "3", "--data-dir", "/tmp/d"),
        ("executor", "--data-dir", "/tmp/d", "--slots", "3"),
    ],
)
def test_global_options_work_before_or_after_the_command(argv: tuple[str, ...]) -> None:
    args, command = parse(*argv)
    settings = settings_from(args, command.options)  # type: ignore[arg-type]
    assert settings.connection.data_dir == Path("/tmp/d")
    assert settings.executor.slots == 3


def test_a_global_option_after_a_nested_command() -> None:
    args, command = parse("client", "list", "--json", "--nats-url", "nats://127.0.0.1:1")
    assert command.words == ("client", "list")
    settings = settings_from(args, command.options)  # type: ignore[arg-type]
    assert settings.connection.nats_url == "nats://127.0.0.1:1"


def test_a_global_option_given_nowhere_leaves_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIDEGATE_DATA_DIR", "/from/env")
    monkeypatch.setenv("TIDEGATE_SLOTS", "7")
    args, command = parse("executor")
    settings = settings_from(args, command.options)  # type: ignore[arg-type]
    assert settings.connection.data_dir == Path("/from/env")
    assert settings.executor.slots == 7


def test_a_flag_wins_over_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDEGATE_SLOTS", "7")
    args, command = parse("executor", "--slots", "2")
    assert settings_from(args, command.options).executor.slots == 2  # type: ignore[arg-type]


def _all_options() -> list[object]:
    return [*GLOBAL, *(o for c in COMMANDS for o in c.options)]


def test_every_setting_an_option_names_exists() -> None:
    sections = {f.name: f.type for f in dataclasses.fields(Settings)}
    defaults = Settings()
    for option in _all_options():
        setting = option.setting  # type: ignore[attr-defined]
        if setting:
            section, _, name = setting.partition(".")
            assert section in sections, setting
            assert hasattr(getattr(defaults, section), name), setting


def test_help_names_each_option_variable(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exited:
            main([*command.words, "--help"])
        assert exited.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())
        for option in (*GLOBAL, *command.options):
            if option.envvar:
                assert f"[env: {option.envvar}]" in shown, (command.name, option.flags)


def test_the_readme_environment_table_and_the_options_agree() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(TIDEGATE_[A-Z_]+)`", section))
    declared = {o.envvar for o in _all_options() if o.envvar}  # type: ignore[attr-defined]
    assert declared <= documented, sorted(declared - documented)
    known = {
        f"TIDEGATE_{f.name.upper()}"
        for s in dataclasses.fields(Settings)
        for f in dataclasses.fields(getattr(Settings(), s.name))
    }
    assert documented <= known | declared, sorted(documented - known - declared)


def test_bad_usage_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["executor", "--slots", "0"])
    assert exited.value.code == 2
    assert "must be 1 or more" in capsys.readouterr().err


def test_every_error_class_derives_from_the_root_and_carries_its_exit_code() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, errors.TidegateError) for c in classes)
    bad_input = {
        errors.ConfigError,
        errors.UsageError,
        errors.InvalidTask,
        errors.UnknownClient,
        errors.DeadLetterNotFound,
        errors.ApiRefused,
    }
    for cls in classes:
        assert cls.exit_code == (2 if cls in bad_input or cls is errors.BadInput else 1), cls
    assert errors.MissingExtra.exit_code == 1  # an installation problem, not bad input


def test_a_missing_third_party_module_names_the_extra() -> None:
    command = Command(("x",), "x", "tidegate_no_such_module_xyz:run", extra="server")
    with pytest.raises(errors.MissingExtra, match=r"pip install 'tidegate\[server\]'"):
        load_handler(command)


def test_a_missing_module_of_ours_is_a_bug_not_an_extra() -> None:
    command = Command(("x",), "x", "tidegate.no_such_module:run", extra="server")
    with pytest.raises(ModuleNotFoundError):
        load_handler(command)


def test_every_command_handler_resolves() -> None:
    for command in COMMANDS:
        assert callable(load_handler(command)), command.name


def test_the_old_folders_are_not_importable_from_the_tests() -> None:
    for name in ("mesh", "executor", "console", "templates", "migrations"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)
