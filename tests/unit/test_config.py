"""`Settings.from_env`: `TIDEGATE_*` variables, overrides, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidegate.config import Settings
from tidegate.errors import ConfigError


def test_no_variables_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "TIDEGATE_NO_SUCH_KNOB": "1"}) == Settings()


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIDEGATE_ROUTE_BATCH", "77")
    assert Settings.from_env().driver.route_batch == 77


def test_ints() -> None:
    s = Settings.from_env(
        {
            "TIDEGATE_ROUTE_BATCH": "100",
            "TIDEGATE_SLOTS": "8",
            "TIDEGATE_MAX_TASK_BYTES": "1024",
            "TIDEGATE_RETENTION_DAYS": " 7 ",
        }
    )
    assert s.driver.route_batch == 100 and isinstance(s.driver.route_batch, int)
    assert s.executor.slots == 8
    assert s.limits.max_task_bytes == 1024
    assert s.driver.retention_days == 7


def test_floats() -> None:
    s = Settings.from_env(
        {
            "TIDEGATE_HEARTBEAT_INTERVAL_S": "0.5",
            "TIDEGATE_SHORT_MAX_TIMEOUT_S": "60",
            "TIDEGATE_PROJECTOR_MAX_COMMITS_PER_S": "1e2",
        }
    )
    assert s.limits.heartbeat_interval_s == 0.5
    assert s.driver.short_max_timeout_s == 60.0 and isinstance(s.driver.short_max_timeout_s, float)
    assert s.driver.projector_max_commits_per_s == 100.0


def test_optional_int_is_read_for_every_section_that_has_it() -> None:
    s = Settings.from_env({"TIDEGATE_METRICS_PORT": "9100"})
    assert s.driver.metrics_port == 9100 and s.executor.metrics_port == 9100
    assert Settings.from_env({}).driver.metrics_port is None


def test_paths_and_strings() -> None:
    s = Settings.from_env(
        {
            "TIDEGATE_DATA_DIR": "/srv/tidegate",
            "TIDEGATE_NATS_URL": "nats://h:4222",
            "TIDEGATE_DATABASE_URL": "postgresql://u@h/db",
            "TIDEGATE_POOL": "gpu",
            "TIDEGATE_DEFAULT_POOL": "batch",
            "TIDEGATE_EXECUTOR_ID": "e1",
        }
    )
    assert s.connection.data_dir == Path("/srv/tidegate")
    assert isinstance(s.connection.data_dir, Path)
    assert s.connection.nats_url == "nats://h:4222"
    assert s.connection.database_url == "postgresql://u@h/db"
    assert (s.executor.pool, s.driver.default_pool, s.executor.executor_id) == (
        "gpu",
        "batch",
        "e1",
    )


@pytest.mark.parametrize("mode", ["batch", "per-event"])
def test_persist_mode(mode: str) -> None:
    assert Settings.from_env({"TIDEGATE_PERSIST": mode}).driver.persist == mode


def test_empty_value_means_unset() -> None:
    s = Settings.from_env({"TIDEGATE_SLOTS": "", "TIDEGATE_PERSIST": "", "TIDEGATE_DATA_DIR": ""})
    assert s == Settings()


def test_overrides_win_over_the_environment() -> None:
    env = {"TIDEGATE_SLOTS": "8", "TIDEGATE_PERSIST": "per-event", "TIDEGATE_DATA_DIR": "/env"}
    s = Settings.from_env(
        env,
        executor={"slots": 3},
        driver={"persist": "batch"},
        connection={"data_dir": Path("/flag")},
    )
    assert s.executor.slots == 3
    assert s.driver.persist == "batch"
    assert s.connection.data_dir == Path("/flag")


def test_a_none_override_leaves_the_environment_value() -> None:
    """CLI flags not given arrive as None: they must not hide the variable."""
    s = Settings.from_env({"TIDEGATE_SLOTS": "8"}, executor={"slots": None, "pool": "gpu"})
    assert s.executor.slots == 8 and s.executor.pool == "gpu"


def test_overrides_touch_only_their_section() -> None:
    s = Settings.from_env({"TIDEGATE_METRICS_PORT": "9100"}, driver={"metrics_port": 0})
    assert s.driver.metrics_port == 0 and s.executor.metrics_port == 9100


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("TIDEGATE_ROUTE_BATCH", "ten"),
        ("TIDEGATE_SLOTS", "1.5"),
        ("TIDEGATE_METRICS_PORT", "http"),
        ("TIDEGATE_HEARTBEAT_INTERVAL_S", "soon"),
        ("TIDEGATE_WORK_ACK_WAIT_S", "3s"),
        ("TIDEGATE_PERSIST", "bogus"),
        ("TIDEGATE_PERSIST", "Batch"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: raw})
    assert var in str(info.value) and repr(raw) in str(info.value)


def test_persist_error_says_what_is_allowed() -> None:
    with pytest.raises(ConfigError, match="`batch` or `per-event`"):
        Settings.from_env({"TIDEGATE_PERSIST": "sometimes"})


# Right type, wrong range: unchecked, they would fail later, far from the variable that caused
# it (TIDEGATE_PROJECTOR_MAX_COMMITS_PER_S=0 divides by zero in the projector, which then
# crash-loops under its supervisor).
@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("TIDEGATE_PROJECTOR_MAX_COMMITS_PER_S", "0"),
        ("TIDEGATE_SLOTS", "0"),
        ("TIDEGATE_ROUTE_BATCH", "-1"),
        ("TIDEGATE_HEARTBEAT_INTERVAL_S", "nan"),
    ],
)
def test_an_out_of_range_value_raises_config_error(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: raw})


def test_zero_is_allowed_where_it_means_something() -> None:
    """TIDEGATE_METRICS_PORT=0 asks for any free port."""
    assert Settings.from_env({"TIDEGATE_METRICS_PORT": "0"}).driver.metrics_port == 0
    with pytest.raises(ConfigError, match=r"TIDEGATE_METRICS_PORT.*0 or more"):
        Settings.from_env({"TIDEGATE_METRICS_PORT": "-1"})


def test_range_error_says_the_bound() -> None:
    with pytest.raises(ConfigError, match="greater than 0"):
        Settings.from_env({"TIDEGATE_SLOTS": "0"})
