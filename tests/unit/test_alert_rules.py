"""The shipped Prometheus alert rules: valid, unit-tested by promtool, each with a runbook.

promtool comes from Debian's `prometheus` package (`.ci/run` installs it). Outside CI the
promtool tests are skipped where it is missing; with CI=true a missing promtool is a failure.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "mesh" / "alerts" / "tidegate.rules.yml"
RULE_TESTS = ROOT / "tests" / "alerts" / "tidegate.rules.test.yml"
README = ROOT / "README.md"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("no promtool: CI must have it (apt-get install prometheus)")
    pytest.skip("no promtool on this machine (apt-get install prometheus)")


def _alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE)


def test_promtool_finds_the_rules_valid() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in done.stdout


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    done = subprocess.run(
        [_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == set(_alerts()), "every alert has a promtool test, and only those"


def test_every_alert_has_a_runbook_entry_in_the_readme() -> None:
    headings = re.findall(r"^#### (.+)$", README.read_text(), flags=re.MULTILINE)
    entries = {name for heading in headings for name in re.findall(r"`(\w+)`", heading)}
    assert set(_alerts()) <= entries
    # Each alert's text points at an entry that exists.
    pointed = set(re.findall(r'"Alerts: (\w+)"', RULES.read_text()))
    assert pointed and pointed <= entries


def test_the_rules_ship_in_the_package() -> None:
    shipped = importlib.resources.files("tidegate") / "alerts" / "tidegate.rules.yml"
    assert shipped.read_text() == RULES.read_text()
