"""compose.yaml against the Compose Specification's JSON schema (compose cannot run here), and
its NATS cluster: three nodes routed to each other, R3 for every component.

The schema is the one `check-jsonschema` vendors (`builtin_schemas/vendor/compose-spec.json`);
tests/integration/test_cluster3.py runs the same three-node topology with local processes.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def _schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendored.read_text())
    return schema


def _errors(document: dict[str, Any]) -> list[str]:
    schema = _schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert _errors(compose) == []


def test_the_schema_check_can_fail(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["nats1"]["restart"] = ["always"]  # must be a string
    broken["services"]["driver"]["replica"] = 2  # no such key (it is deploy.replicas)
    assert len(_errors(broken)) >= 2


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_three_nats_nodes_routed_to_each_other_with_r3(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = sorted(n for n in services if n.startswith("nats"))
    assert nodes == ["nats1", "nats2", "nats3"]
    for node in nodes:
        command = services[node]["command"]
        assert "-js" in command and _flag(command, "-n") == node
        assert _flag(command, "--cluster_name") == "tidegate"
        port = _flag(command, "--cluster").rsplit(":", 1)[1]
        routes = set(_flag(command, "--routes").split(","))
        assert routes == {f"nats://{other}:{port}" for other in nodes if other != node}
        volume = services[node]["volumes"][0].split(":")[0]
        assert volume in compose["volumes"], "each node keeps its own JetStream store"
    for component in ("driver", "executor", "console"):
        env = services[component]["environment"]
        assert env["TIDEGATE_REPLICAS"] == "3"
        # Each component as its own NATS user, its password from .env (README: "Who may do
        # what on the bus"); every node.
        urls = env["TIDEGATE_NATS_URL"].split(",")
        password = f"${{TIDEGATE_NATS_{component.upper()}_PASSWORD:?generate one first}}"
        assert sorted(urls) == [f"nats://{component}:{password}@{n}:4222" for n in nodes]
        assert set(services[component]["depends_on"]) >= set(nodes)


def test_every_node_admits_only_the_users_the_users_service_made(compose: dict[str, Any]) -> None:
    services = compose["services"]
    users = services["bus-users"]
    assert "nats-config --from-env" in users["command"][0]
    assert "nats-users:/users" in users["volumes"]
    for node in ("nats1", "nats2", "nats3"):
        command = services[node]["command"]
        config = services[node]["configs"][0]
        assert _flag(command, "-c") == config["target"] == "/etc/nats/tidegate.conf"
        # A reload reads the file alone: it names the server and cluster the flags name.
        text = compose["configs"][config["source"]]["content"]
        assert f"server_name: {_flag(command, '-n')}\n" in text
        assert f"name: {_flag(command, '--cluster_name')}," in text
        routes = _flag(command, "--routes").split(",")
        assert all(f'"{route}"' in text for route in routes)
        # Relative to /etc/nats: the users the `bus-users` service writes.
        assert "include ../../users/nats/auth.conf" in text
        assert "nats-users:/users:ro" in services[node]["volumes"]
        assert services[node]["depends_on"]["bus-users"] == {
            "condition": "service_completed_successfully"
        }
