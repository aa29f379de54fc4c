"""The distribution: one top-level package, an SDK-only base install, and the layers contract.

These build and install for real (a wheel, fresh virtual environments, the package index for
nats-py and msgspec), so they are marked slow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The design card's folders and where they land in the one package.
FOLDERS = {
    "mesh": "tidegate",
    "executor": "tidegate/executor",
    "console": "tidegate/console",
    "migrations": "tidegate/migrations",
    "templates": "tidegate/templates",
}


def run(
    *argv: str | Path, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, ROOT, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = out.glob("tidegate-*.whl")
    return path


@pytest.fixture(scope="module")
def base_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with the wheel and no extras: what a client system installs."""
    venv = tmp_path_factory.mktemp("base") / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip = run(venv / "bin" / "pip", "install", "--disable-pip-version-check", wheel, timeout=600)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {name.split("/", 1)[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"tidegate"}, sorted(top)
    assert len(dist_info) == 1
    # The folders arrive inside it, SQL and templates included.
    for expected in (
        "tidegate/client.py",
        "tidegate/executor/agent.py",
        "tidegate/console/app.py",
        "tidegate/migrations/0001_init.sql",
        "tidegate/templates/base.html",
        "tidegate/templates/static/console.css",
        "tidegate/store/queries.sql",
        "tidegate/py.typed",
        "tidegate/alerts/tidegate.rules.yml",
    ):
        assert expected in names, expected


@pytest.mark.slow
def test_the_base_install_is_the_sdk_alone(base_venv: Path) -> None:
    python = base_venv / "bin" / "python"
    code = (
        "from tidegate import TidegateClient, TaskSpec, TidegateError; "
        "import importlib.util as u; "
        "print(TidegateClient.__module__, "
        "[m for m in ('psycopg', 'litestar', 'pgserver', 'apscheduler') if u.find_spec(m)])"
    )
    done = run(python, "-c", code, cwd=base_venv.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tidegate.client", "[]"]
    # Nothing of the old layout is importable: the folders are not packages of their own.
    for old in ("mesh", "executor", "console", "templates", "migrations"):
        gone = run(python, "-c", f"import {old}", cwd=base_venv.parent)
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, old


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (("up",), "embedded"),
        (("bench", "flood", "--tasks", "10"), "embedded"),
        (("driver",), "server"),
        (("tasks",), "server"),
        (("console",), "console"),
    ],
)
def test_a_command_of_a_missing_extra_exits_1_naming_it(
    base_venv: Path, argv: tuple[str, ...], extra: str
) -> None:
    done = run(base_venv / "bin" / "tidegate", *argv, cwd=base_venv.parent, timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"pip install 'tidegate[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_the_base_install_parses_every_command(base_venv: Path) -> None:
    for argv in (("--help",), ("up", "--help"), ("client", "add", "--help")):
        done = run(base_venv / "bin" / "python", "-m", "tidegate", *argv, cwd=base_venv.parent)
        assert done.returncode == 0, (argv, done.stderr)
    bad = run(base_venv / "bin" / "tidegate", "submit", cwd=base_venv.parent)
    assert bad.returncode == 2 and "--client" in bad.stderr


# --- the layers contract -------------------------------------------------------------------------


def _laid_out_package(dest: Path) -> Path:
    """The source folders copied into the shape they install in (`dest/tidegate/…`)."""
    skip = shutil.ignore_patterns("__pycache__")
    for folder, target in FOLDERS.items():
        shutil.copytree(ROOT / folder, dest / target, ignore=skip, dirs_exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).parent / "lint-imports"
    # PYTHONPATH puts the copy ahead of the installed package.
    return subprocess.run(
        [str(lint), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=where,
        env={"PYTHONPATH": str(where), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_the_layers_contract_holds_and_reads_every_folder(tmp_path: Path) -> None:
    tree = _laid_out_package(tmp_path)
    done = _lint_imports(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
    # Without the executor's folder the contract fails: it checks the graph it read.
    shutil.rmtree(tree / "tidegate" / "executor")
    missing = _lint_imports(tree)
    assert missing.returncode != 0
    assert "tidegate.executor does not exist" in missing.stdout + missing.stderr


def test_the_layers_contract_fails_on_a_new_cycle(tmp_path: Path) -> None:
    tree = _laid_out_package(tmp_path)
    # Two siblings of one layer importing each other: no layer rule is broken, only the
    # no-cycles rule.
    for module, other in (("lease", "pull"), ("pull", "lease")):
        path = tree / "tidegate" / "bus" / f"{module}.py"
        path.write_text(path.read_text() + f"\nfrom tidegate.bus import {other}  # noqa\n")
    done = _lint_imports(tree)
    assert done.returncode != 0
    assert "no import cycles" in done.stdout and "BROKEN" in done.stdout, done.stdout


def test_the_layers_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path: Path) -> None:
    tree = _laid_out_package(tmp_path)
    store = tree / "tidegate" / "store" / "rows.py"
    store.write_text(store.read_text() + "\nimport tidegate.driver.route  # noqa\n")
    done = _lint_imports(tree)
    assert done.returncode != 0
    assert "tidegate.store.rows -> tidegate.driver.route" in done.stdout, done.stdout
