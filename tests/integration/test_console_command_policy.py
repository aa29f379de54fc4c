"""The console's client form and JSON API set a client's command policy (allowed executables,
working directories, shell), checked with clear errors, stored and mirrored to the drivers."""

from __future__ import annotations

import html
from typing import Any

import pytest
from test_console_access import csrf
from test_console_pages import app, mirrored, operator, store  # noqa: F401  (fixtures)

from tidegate.errors import StoreError
from tidegate.store.store import Store

Client = Any


async def test_the_form_sets_shows_and_clears_the_policy(
    operator: Client,  # noqa: F811
    store: Store,  # noqa: F811
    nats_url: str,
) -> None:
    added = await operator.post(
        "/clients",
        data={
            "name": "jobs",
            "transport": "none",
            "allowed_executables": "/usr/bin/python3\r\n /opt/jobs/* \r\n\r\n",
            "allowed_cwds": "/srv/jobs",
            "no_shell": "on",
        },
        headers=csrf(operator),
        follow_redirects=False,
    )
    assert added.status_code in (302, 303), added.text
    record = await store.get_client("jobs")
    assert record is not None
    assert record.allowed_executables == ("/usr/bin/python3", "/opt/jobs/*")
    assert record.allowed_cwds == ("/srv/jobs",) and record.allow_shell is False
    seen = await mirrored(nats_url, "jobs")  # what every driver checks tasks against
    assert seen.allowed_executables == record.allowed_executables and not seen.allow_shell

    form = html.unescape((await operator.get("/clients/jobs/edit")).text)
    assert ">/usr/bin/python3\n/opt/jobs/*</textarea>" in form
    assert ">/srv/jobs</textarea>" in form
    assert 'name="no_shell" checked' in form

    # Emptied textareas and the box left unticked: any executable, any directory, shell again.
    cleared = await operator.post(
        "/clients/jobs",
        data={"transport": "none", "allowed_executables": "", "allowed_cwds": "  "},
        headers=csrf(operator),
        follow_redirects=False,
    )
    assert cleared.status_code in (302, 303), cleared.text
    record = await store.get_client("jobs")
    assert record is not None
    assert (record.allowed_executables, record.allowed_cwds, record.allow_shell) == (
        None,
        None,
        True,
    )
    assert (await mirrored(nats_url, "jobs")).allow_shell


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("allowed_executables", "python3", "allowed_executables: python3 is not an absolute path"),
        ("allowed_executables", "/usr/bin/../sbin/*", "has a &#39;..&#39; component"),
        ("allowed_cwds", "srv/jobs", "allowed_cwds: srv/jobs is not an absolute path"),
    ],
)
async def test_a_bad_policy_entry_is_a_clear_422(
    operator: Client,  # noqa: F811
    field: str,
    value: str,
    says: str,
) -> None:
    data = {"name": "jobs", "transport": "none", field: value}
    answer = await operator.post("/clients", data=data, headers=csrf(operator))
    assert answer.status_code == 422, answer.text
    assert says in answer.text and 'role="alert"' in answer.text


async def test_the_json_api_sets_and_patches_the_policy(
    operator: Client,  # noqa: F811
    store: Store,  # noqa: F811
) -> None:
    created = await operator.post(
        "/api/v1/clients",
        json={"name": "api-jobs", "allowed_executables": ["/usr/bin/*"], "allow_shell": False},
        headers=csrf(operator),
    )
    assert created.status_code == 201, created.text
    out = created.json()["client"]
    assert out["allowed_executables"] == ["/usr/bin/*"] and out["allowed_cwds"] is None
    assert out["allow_shell"] is False

    patched = await operator.patch(
        "/api/v1/clients/api-jobs", json={"allowed_cwds": ["/srv"]}, headers=csrf(operator)
    )
    assert patched.status_code == 200, patched.text
    out = patched.json()["client"]
    assert out["allowed_cwds"] == ["/srv"] and out["allowed_executables"] == ["/usr/bin/*"]
    assert out["allow_shell"] is False  # left out of the PATCH: unchanged

    for body, says in [
        ({"allowed_executables": []}, "empty list would refuse every task"),
        ({"allowed_cwds": ["relative"]}, "not an absolute path"),
    ]:
        refused = await operator.patch(
            "/api/v1/clients/api-jobs", json=body, headers=csrf(operator)
        )
        assert refused.status_code == 422 and says in refused.json()["error"], refused.text
    record = await store.get_client("api-jobs")
    assert record is not None and record.allowed_cwds == ("/srv",)

    # The database refuses what the console would, should anything write it another way.
    with pytest.raises(StoreError, match="allowed_executables: at most 256 absolute paths"):
        await store.update_client("api-jobs", allowed_executables=("/ok", "/a/../b"))
    with pytest.raises(StoreError, match="allowed_cwds"):
        await store.update_client("api-jobs", allowed_cwds=("/ok\n/b",))
