"""`tidegate up` starts a dead embedded server again, and gives up loudly when it keeps dying."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidegate.errors import EmbeddedServerError
from tidegate.up.servers import REVIVE_MAX_QUICK_FAILURES, Revival, ServerGaveUp


def _revival(tmp_path: Path, *, down: list[bool], starts: list[str]) -> Revival:
    def start() -> None:
        starts.append("try")
        if starts.count("try") <= starts.count("fail-next"):
            raise EmbeddedServerError("port in use")
        down[0] = False

    return Revival(
        "nats-server",
        tmp_path / "nats-server.log",
        is_down=lambda: down[0],
        start=start,
        pid=lambda: 42,
    )


async def test_a_dead_server_is_started_again(tmp_path: Path) -> None:
    down, starts = [False], []
    r = _revival(tmp_path, down=down, starts=starts)
    assert await r.round() is False and starts == []
    down[0] = True
    assert await r.round() is False  # noticed; the first try waits a short backoff
    r.next_try = 0.0
    assert await r.round() is True
    assert (r.restarts, r.down_since, starts) == (1, None, ["try"])


async def test_it_gives_up_after_quick_failures_in_a_row(tmp_path: Path) -> None:
    (tmp_path / "nats-server.log").write_text("[FTL] disk full\n")
    down, starts = [True], ["fail-next"] * 100
    r = _revival(tmp_path, down=down, starts=starts)
    with pytest.raises(ServerGaveUp, match="giving up") as raised:
        for _ in range(REVIVE_MAX_QUICK_FAILURES * 2):
            r.next_try = 0.0
            await r.round()
    assert "nats-server.log" in str(raised.value)
    # The death is the first failure; each failed start one more, past the bound it stops.
    assert starts.count("try") == REVIVE_MAX_QUICK_FAILURES
    assert r.restarts == 0
