"""`python -m tidegate.bench.callback_send` measures each sender against the flood's receiver
in a child process: a short run, so the benchmark does not rot between its real runs."""

from __future__ import annotations

import pytest

from tidegate.bench.callback_send import HEADER, SENDERS, SendConfig, format_row, run


async def test_every_sender_delivers_and_is_measured() -> None:
    cfg = SendConfig(
        clients=2,
        concurrency=2,
        latencies_ms=(5.0,),
        batches=(1, 4),
        warmup_s=0.2,
        seconds=0.5,
        repeat=1,
    )
    lines: list[str] = []
    figures = await run(cfg, lines.append)
    assert [(f.sender, f.batch) for f, _ in figures] == [
        (s, b) for b in cfg.batches for s in SENDERS
    ]
    for fig, _ in figures:
        assert fig.requests_per_s > 0, fig
        assert fig.callbacks_per_s == pytest.approx(fig.requests_per_s * fig.batch, rel=0.01)
        assert fig.cpu_s_per_1000_callbacks > 0, fig
        # Keep-alive: the senders that pool reuse their connections within the window.
        if fig.sender != "httpx-default":
            assert fig.connections <= cfg.clients * cfg.concurrency, fig
    assert HEADER.splitlines()[0].count("|") == format_row(figures[0][0]).count("|")
