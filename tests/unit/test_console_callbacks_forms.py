"""The Callbacks and Audit pages' pure parts: input parsing, durations, audit filters, and the
confirmation fragments as rendered from the real templates."""

from __future__ import annotations

from datetime import UTC, datetime

import jinja2
import pytest

from tidegate.console import audit
from tidegate.console import callback_forms as forms
from tidegate.console.app import templates_dir
from tidegate.store.callbacks import Scope
from tidegate.store.operators import AuditEntry


@pytest.fixture(scope="module")
def env() -> jinja2.Environment:
    e = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()), autoescape=True)
    e.globals["csrf_token"] = lambda: "tok"
    return e


def test_page_query_names_the_bad_field() -> None:
    q = forms.parse_query({"client": " a-1 ", "after": "40", "dead_before": "7"})
    assert q == forms.PageQuery(client="a-1", after=40, dead_before=7)
    assert forms.parse_query({"client": "", "after": ""}) == forms.PageQuery()
    for raw, field in [
        ({"client": "a b"}, "client:"),
        ({"client": "x" * 65}, "client:"),
        ({"after": "-1"}, "after:"),
        ({"after": "²"}, "after:"),
        ({"after": "9" * 30}, "after:"),
        ({"dead_before": "0"}, "dead_before:"),
    ]:
        with pytest.raises(forms.FormError, match=f"^{field}"):
            forms.parse_query(raw)


def test_confirmation_carries_the_count_and_the_newest_id() -> None:
    assert forms.parse_confirmation({"client": "a"}) is None  # asking, not confirming
    assert forms.parse_confirmation({"confirm": "3", "upto": "91"}) == Scope(count=3, upto=91)
    assert forms.parse_confirmation({"confirm": "0"}) == Scope(count=0, upto=None)
    with pytest.raises(forms.FormError, match=r"^upto:"):
        forms.parse_confirmation({"confirm": "3"})
    with pytest.raises(forms.FormError, match=r"^confirm:"):
        forms.parse_confirmation({"confirm": "three", "upto": "9"})


def test_span_reads_like_an_operator_would_say_it() -> None:
    assert [forms.span(s) for s in (0, 4.4, 89, 600, 5400, 9000, 3 * 86400)] == [
        "0 s",
        "4 s",
        "89 s",
        "10 min",
        "1.5 h",
        "2.5 h",
        "3.0 d",
    ]
    assert forms.span(-12) == "12 s"


def test_confirm_fragment_asks_with_the_count(env: jinja2.Environment) -> None:
    html = env.get_template("callbacks_confirm.html").render(
        action="redrive", client="x", scope=Scope(count=3, upto=91), changed=False
    )
    assert "Re-drive 3 dead letters of client x?" in html
    assert 'name="confirm" value="3"' in html and 'name="upto" value="91"' in html
    assert 'name="client" value="x"' in html and 'name="_csrf_token" value="tok"' in html
    assert 'hx-post="/callbacks/dead/redrive"' in html and "changed" not in html

    again = env.get_template("callbacks_confirm.html").render(
        action="retry", client=None, scope=Scope(count=1, upto=5), changed=True
    )
    assert "Retry 1 callback of every client now?" in again and "count changed" in again
    assert 'name="client"' not in again and 'hx-post="/callbacks/outbox/retry"' in again

    nothing = env.get_template("callbacks_confirm.html").render(
        action="redrive", client="x", scope=Scope(count=0, upto=None), changed=True
    )
    assert "<form" not in nothing and "nothing to re-drive" in nothing


def test_message_fragment_escapes(env: jinja2.Environment) -> None:
    html = env.get_template("callbacks_message.html").render(text="<b>x</b>", kind="error")
    assert "&lt;b&gt;" in html and 'role="alert"' in html


def test_audit_filters() -> None:
    f = audit.parse_filters({"actor": "alice", "action": "callback.", "target": "Acme"})
    entry = AuditEntry(
        id=1,
        at=datetime.now(UTC),
        actor="alice",
        action="callback.redrive-bulk",
        target="acme-prod",
        details={},
    )
    assert f.filtering and f.matches(entry)
    assert not audit.AuditFilters(actor="bob").matches(entry)
    assert not audit.AuditFilters(action="client.").matches(entry)
    assert not audit.AuditFilters().filtering
    assert audit.parse_filters({"before": "12"}).before == 12
    with pytest.raises(audit.FilterError, match=r"^before:"):
        audit.parse_filters({"before": "x"})
    with pytest.raises(audit.FilterError, match=r"^target:"):
        audit.parse_filters({"target": "t" * 201})
