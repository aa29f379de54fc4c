"""Finding an attempt's log file where the runner wrote it, and the executor's answers to log
requests: validation, bounds, reasons (files on disk, no servers)."""

from __future__ import annotations

import errno
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from tidegate import names
from tidegate.executor import logserver, tasklogs
from tidegate.executor.logserver import (
    BadLogRequest,
    LogServer,
    parse_request,
    read_part,
    whole_lines,
)
from tidegate.wire import LOG_CHUNK_MAX, LogRequest, decode_log_chunk, encode

NOW = datetime.now(UTC)
TASK = "alpha:wf-1.node-3"


def write(root: Path, task_id: str, attempt: int, at: datetime, data: bytes) -> Path:
    path = tasklogs.log_path(root, task_id, attempt, at)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def server(root: Path, max_payload: int = 1024 * 1024) -> LogServer:
    nc: Any = SimpleNamespace(max_payload=max_payload)  # `answer` reads only this of NATS
    return LogServer(nc, "exec-0", root, keep_hours=48)


def request(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


# --- the file lookup ---------------------------------------------------------------------------


def test_the_start_names_the_hour_directory(tmp_path: Path) -> None:
    at = NOW - timedelta(hours=5)
    path = write(tmp_path, TASK, 2, at, b"x\n")
    assert path.parent.name == at.strftime("%Y%m%d%H")
    assert tasklogs.find_log(tmp_path, TASK, 2, at) == path
    assert tasklogs.find_log(tmp_path, TASK, 2, at.replace(tzinfo=None)) == path  # taken as UTC
    # Another host's clock a little off across an hour edge: the neighbour hour is looked at.
    assert tasklogs.find_log(tmp_path, TASK, 2, at + timedelta(minutes=61)) == path
    # A start hours away is another run of the same id: not this file.
    assert tasklogs.find_log(tmp_path, TASK, 2, at - timedelta(hours=3)) is None
    assert tasklogs.find_log(tmp_path, TASK, 3, at) is None
    assert tasklogs.find_log(tmp_path, "alpha:other", 2, at) is None


def test_without_the_start_every_hour_is_searched_newest_first(tmp_path: Path) -> None:
    older = write(tmp_path, TASK, 1, NOW - timedelta(hours=30), b"first run\n")
    newer = write(tmp_path, TASK, 1, NOW - timedelta(hours=2), b"second run\n")
    (tmp_path / "lost+found").mkdir()  # not an hour: ignored
    assert tasklogs.find_log(tmp_path, TASK, 1) == newer
    newer.unlink()
    assert tasklogs.find_log(tmp_path, TASK, 1) == older
    assert tasklogs.find_log(tmp_path, TASK, 2) is None
    assert tasklogs.find_log(tmp_path / "absent", TASK, 1) is None


def test_pruned_is_an_hour_entirely_past_retention() -> None:
    keep = timedelta(hours=48)
    assert tasklogs.pruned(NOW - timedelta(hours=50), keep, NOW)
    assert not tasklogs.pruned(NOW - timedelta(hours=47), keep, NOW)
    assert not tasklogs.pruned(NOW, keep, NOW)


def test_the_log_subject_is_one_token_per_executor() -> None:
    assert names.executor_log_subject("exec-0") == "tg.exec.exec-0.log"
    dotted = names.executor_log_subject("host.example.com-12")
    assert dotted.startswith("tg.exec.=") and dotted.count(".") == 3
    assert dotted != names.executor_log_subject("host.example.com-13")


# --- request validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "not a JSON LogRequest"),
        (b"{nope", "not a JSON LogRequest"),
        (b"[]", "Expected `object`"),
        (request(attempt=1), "missing required field `task_id`"),
        (request(task_id=TASK), "missing required field `attempt`"),
        (request(task_id="", attempt=1), "task_id"),
        (request(task_id=TASK, attempt=0), "attempt"),
        (request(task_id=TASK, attempt="1"), "attempt"),
        (request(task_id=TASK, attempt=1, offset=-1), "offset"),
        (request(task_id=TASK, attempt=1, limit=0), "limit"),
        (request(task_id=TASK, attempt=1, limit=LOG_CHUNK_MAX + 1), "limit"),
        (request(task_id=TASK, attempt=1, started_at="yesterday"), "started_at"),
        (request(task_id=TASK, attempt=1, started_at="0001-01-01T00:00:00Z"), "not a real start"),
    ],
)
def test_a_bad_request_is_a_clear_reason(data: bytes, says: str) -> None:
    with pytest.raises(BadLogRequest, match="bad log request") as caught:
        parse_request(data)
    assert says in str(caught.value)


def test_a_good_request_keeps_its_defaults() -> None:
    req = parse_request(request(task_id=TASK, attempt=2, extra="ignored"))
    assert req == LogRequest(task_id=TASK, attempt=2, offset=0, limit=LOG_CHUNK_MAX)


async def test_the_executor_answers_a_bad_request_with_its_reason(tmp_path: Path) -> None:
    chunk = await server(tmp_path).answer(b"\xff\xfe")
    assert not chunk.found and chunk.reason and "bad log request" in chunk.reason


# --- reading parts ------------------------------------------------------------------------------


def test_a_part_ends_after_a_line_or_a_whole_character() -> None:
    assert whole_lines(b"one\ntwo\nthr") == b"one\ntwo\n"
    assert whole_lines(b"abc\xc3") == b"abc"  # é cut after its first byte
    assert whole_lines(b"ab\xe2\x82") == b"ab"  # € cut after two of three
    assert whole_lines(b"ab\xe2\x82\xac") == b"ab\xe2\x82\xac"
    assert whole_lines(b"\xe2\x82") == b"\xe2\x82"  # never empty: the reader moves on


def test_read_part_pages_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"".join(b"line %03d\n" % i for i in range(100)))  # 9 bytes a line
    first = read_part(path, 0, 50)
    assert first.data == b"".join(b"line %03d\n" % i for i in range(5)) and first.size == 900
    last = read_part(path, 891, 50)
    assert last.data == b"line 099\n" and not last.truncated
    assert read_part(path, 2000, 50).data == b""


def test_read_part_sees_the_truncation_line(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"x" * 100 + b"\n[tidegate: log truncated at 100 bytes]\n")
    assert read_part(path, 0, 10).truncated


async def test_the_executor_answers_a_part_and_where_the_next_starts(tmp_path: Path) -> None:
    at = NOW - timedelta(hours=1)
    text = "".join(f"ligne {i} é\n" for i in range(1000)).encode() + b"bad \xff byte"
    write(tmp_path, TASK, 1, at, text)
    logs = server(tmp_path)
    got, offset = b"", 0
    while True:
        raw = await logs.answer(request(task_id=TASK, attempt=1, offset=offset, limit=1000))
        chunk = decode_log_chunk(encode(raw))  # through the wire form, as the console gets it
        assert chunk.found and chunk.offset == offset and chunk.size == len(text)
        assert chunk.next_offset - offset <= 1000
        got += chunk.data.encode()
        if chunk.next_offset == chunk.size:
            break
        assert chunk.data.endswith("\n")
        offset = chunk.next_offset
    assert got.decode() == text.decode("utf-8", errors="replace")
    assert got.decode().endswith("bad \ufffd byte")


async def test_a_reply_always_fits_in_one_nats_message(tmp_path: Path) -> None:
    # Control bytes cost six bytes of JSON each: the executor halves the part until it fits.
    write(tmp_path, TASK, 1, NOW, b"\x01" * LOG_CHUNK_MAX)
    chunk = await server(tmp_path, max_payload=300_000).answer(request(task_id=TASK, attempt=1))
    assert chunk.found and 0 < chunk.next_offset < LOG_CHUNK_MAX
    assert len(encode(chunk)) <= 300_000


async def test_a_missing_log_says_why(tmp_path: Path) -> None:
    logs = server(tmp_path)
    here = await logs.answer(request(task_id=TASK, attempt=3))
    assert not here.found and here.reason and here.reason.startswith("not on this executor")
    assert "exec-0" in here.reason and "attempt 3" in here.reason
    old = (NOW - timedelta(hours=60)).isoformat()
    gone = await logs.answer(request(task_id=TASK, attempt=1, started_at=old))
    assert not gone.found and gone.reason and gone.reason.startswith("pruned after 48 h")


async def test_an_unreadable_log_is_a_reason_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, TASK, 1, NOW, b"x\n")

    def failing_disk(path: Path, offset: int, limit: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(logserver, "read_part", failing_disk)
    chunk = await server(tmp_path).answer(request(task_id=TASK, attempt=1))
    assert not chunk.found and chunk.reason and "Input/output error" in chunk.reason
