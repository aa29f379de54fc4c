"""The collector settings: services tune their own; the SDK only pauses its host's."""

from __future__ import annotations

import gc
import subprocess
import sys

from tidegate.collector import YOUNG_THRESHOLD, collector_paused


def test_a_pause_disables_the_collector_and_restores_it_as_found() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a host that had it off keeps it off
    finally:
        gc.enable()


def test_a_pause_restores_the_collector_when_the_step_raises() -> None:
    try:
        with collector_paused():
            raise ValueError("bad batch")
    except ValueError:
        pass
    assert gc.isenabled()


def test_a_service_freezes_what_it_started_with_and_collects_young_objects_less_often() -> None:
    # In a process of its own: the test process's collector is not ours to retune.
    code = (
        "import gc; from tidegate.collector import tune_for_floods; tune_for_floods(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0, gc.isenabled())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(YOUNG_THRESHOLD), "True", "True"]
