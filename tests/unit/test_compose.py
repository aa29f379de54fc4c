"""compose.yaml against the Compose Specification's JSON schema (compose cannot run here), and
its NATS cluster: three nodes routed to each other, R3 for every component.

The schema is the one `check-jsonschema` vendors (`builtin_schemas/vendor/compose-spec.json`);
tests/integration/test_cluster3.py runs the same three-node topology with local processes.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
DOCKERFILE = COMPOSE.parent / "Dockerfile"
# A value from .env, required: `${NAME:-default}` would be a fixed password for everyone.
_ENV_REFERENCE = re.compile(r"\$\{(TIDEGATE_[A-Z_]+_PASSWORD):\?[^}]*\}")


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


def _strings(node: Any, key: str = "") -> list[tuple[str, str]]:
    """Every string value in the document, with the mapping key it is under."""
    if isinstance(node, dict):
        return [pair for k, v in node.items() for pair in _strings(v, str(k))]
    if isinstance(node, list):
        return [pair for item in node for pair in _strings(item, key)]
    return [(key, node)] if isinstance(node, str) else []


def test_no_password_is_written_in_the_file_only_required_env_references(
    compose: dict[str, Any],
) -> None:
    text = COMPOSE.read_text()
    referenced = set(_ENV_REFERENCE.findall(text))
    assert "TIDEGATE_PG_SUPERUSER_PASSWORD" in referenced
    # Every `${...}` outside the header's shell lines is a required .env value.
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    references = re.findall(r"\$\{[^}]*\}", body)
    assert references and all(_ENV_REFERENCE.fullmatch(r) for r in references), references
    for key, value in _strings(compose):
        if "PASSWORD" in key.upper():
            assert _ENV_REFERENCE.fullmatch(value), f"{key}: {value}"
        for secret in re.findall(r"://[^/:@\s]+:([^@\s]+)@", value):
            assert _ENV_REFERENCE.fullmatch(secret), f"{key}: {value}"
    # The header tells how to generate each of them into .env.
    generated = {
        f"TIDEGATE_{prefix}{who}_PASSWORD"
        for whos, prefix in re.findall(
            r"for who in ([A-Z_ ]+); do[^\n]*\n#\s+echo \"TIDEGATE_([A-Z_]*)\$\{who\}_PASSWORD=",
            text,
        )
        for who in whos.split()
    }
    assert generated == referenced


def test_postgres_components_connect_as_a_role_that_is_no_superuser(
    compose: dict[str, Any],
) -> None:
    postgres = compose["services"]["postgres"]
    env = postgres["environment"]
    # The image's superuser (POSTGRES_USER) is not the components' role: an init script makes
    # that one, NOSUPERUSER, owning its database (tests/integration/test_migrate_as_owner.py
    # runs the script and every migration as that role).
    assert env["POSTGRES_USER"] == "postgres"
    assert env["POSTGRES_PASSWORD"] == "${TIDEGATE_PG_SUPERUSER_PASSWORD:?generate one first}"
    for component in ("driver", "executor", "console"):
        # Not urlsplit: the `?` of `${NAME:?message}` would start a query string.
        url = re.fullmatch(
            r"postgresql://(?P<user>\w+):(?P<password>\$\{[^}]*\})@postgres:5432/(?P<db>\w+)",
            compose["services"][component]["environment"]["TIDEGATE_DATABASE_URL"],
        )
        assert url is not None
        assert url["user"] == env["TIDEGATE_DB_USER"] != env["POSTGRES_USER"]
        assert url["db"] == env["TIDEGATE_DB_NAME"]
        assert url["password"] == env["TIDEGATE_DB_PASSWORD"]
        assert url["password"] == "${TIDEGATE_DB_PASSWORD:?generate one first}"
    init = [
        c["source"]
        for c in postgres["configs"]
        if c["target"].startswith("/docker-entrypoint-initdb.d/") and c["target"].endswith(".sql")
    ]
    assert init == ["postgres-init"]
    script = compose["configs"]["postgres-init"]["content"]
    assert "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';" in script
    assert 'CREATE DATABASE :"app_db" OWNER :"app_user";' in script
    # Names and password from the service's environment: nothing for compose to interpolate.
    assert "\\getenv app_password TIDEGATE_DB_PASSWORD\n" in script and "$" not in script
    # Healthy only once the real server listens (TCP): the image's temporary server, while
    # the init script runs, has its Unix socket only.
    assert "pg_isready -h 127.0.0.1 " in postgres["healthcheck"]["test"][1]


def test_executor_runs_as_root_and_its_tasks_as_an_unprivileged_user(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    executor = services["executor"]
    assert str(executor.get("user")) in {"0", "root"}
    task_user = executor["environment"].get("TIDEGATE_TASK_USER")
    assert task_user and task_user not in {"0", "root", "tidegate"}
    # A user of the image (Dockerfile), not one of the components.
    assert re.search(rf"useradd [^\n]*\b{re.escape(task_user)}\n", DOCKERFILE.read_text())
    for component in ("driver", "console"):
        assert "user" not in services[component]  # the image's own: tidegate
