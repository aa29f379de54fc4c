from datetime import UTC, datetime, timedelta
from pathlib import Path

from tidegate.executor.tasklogs import expired_hours, log_path

NOW = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)


def test_log_files_are_grouped_by_utc_hour(tmp_path: Path) -> None:
    path = log_path(tmp_path, "alpha:k1", 2, NOW)
    assert path.parent.name == "2026112712" and path.name.endswith(".2.log")


def test_only_whole_hours_past_retention_expire(tmp_path: Path) -> None:
    for hours_ago in (0, 1, 2, 3, 30):
        (tmp_path / (NOW - timedelta(hours=hours_ago)).strftime("%Y%m%d%H")).mkdir()
    (tmp_path / "not-an-hour").mkdir()
    old = sorted(p.name for p in expired_hours(tmp_path, timedelta(hours=2), NOW))
    # Cutoff 10:30: the 09:00 hour has ended by then, the 10:00 hour has not.
    assert old == ["2026112606", "2026112709"]
