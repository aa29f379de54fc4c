"""The command table: each command's words, help, options, handler and the extra it needs.

Handlers are named, not imported: a command's handler module imports what its extra installs
(the driver needs psycopg, `up` the embedded servers), and `pip install tidegate` alone must
still parse every command and say which extra a missing one needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tidegate.cli import options as o

# The extra that provides each command's dependencies ("" = the base distribution).
BASE, SERVER, CONSOLE, EMBEDDED = "", "server", "console", "embedded"


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # ("client", "add")
    help: str
    handler: str  # "module:function", imported when the command runs
    extra: str = BASE
    options: Sequence[o.Option] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return "tidegate " + " ".join(self.words)


def _h(module: str, function: str) -> str:
    return f"tidegate.cli.{module}:{function}"


COMMANDS: Sequence[Command] = (
    Command(
        ("up",),
        "run the whole system on embedded defaults, until Ctrl-C",
        _h("up", "up"),
        EMBEDDED,
        o.UP,
    ),
    Command(
        ("driver",),
        "run one driver (route, dispatch, project, notify, retry)",
        _h("serve", "driver"),
        SERVER,
        o.DRIVER,
    ),
    Command(("executor",), "run one executor", _h("serve", "executor"), SERVER, o.EXECUTOR),
    Command(("console",), "run the web console", _h("console", "console"), CONSOLE, o.CONSOLE),
    Command(("migrate",), "apply the SQL migrations", _h("serve", "migrate"), SERVER),
    Command(
        ("client", "add"), "register a client system", _h("clients", "add"), SERVER, o.CLIENT_ADD
    ),
    Command(("client", "list"), "list client systems", _h("clients", "list_"), SERVER, (o.JSON,)),
    Command(
        ("client", "set"),
        "change a client system (takes effect within a second)",
        _h("clients", "set_"),
        SERVER,
        o.CLIENT_SET,
    ),
    Command(
        ("client", "credentials"),
        "give a client system new NATS credentials (printed once), or --revoke them",
        _h("natsusers", "credentials"),
        SERVER,
        o.CLIENT_CREDENTIALS,
    ),
    Command(
        ("nats-config",),
        "print the NATS `authorization` block (users, permissions) for an existing cluster",
        _h("natsusers", "nats_config"),
        SERVER,
        o.NATS_CONFIG,
    ),
    Command(
        ("client", "rotate-secret"),
        "give a client a new callback secret; the old one still signs during an overlap",
        _h("clients", "rotate_secret"),
        SERVER,
        o.CLIENT_ROTATE,
    ),
    Command(
        ("operator", "add"),
        "add a console operator; prints a generated password once",
        _h("operators", "add"),
        SERVER,
        o.OPERATOR_ADD,
    ),
    Command(
        ("operator", "list"), "list console operators", _h("operators", "list_"), SERVER, (o.JSON,)
    ),
    Command(
        ("operator", "set-password"),
        "give an operator a new password (their console sessions end)",
        _h("operators", "set_password"),
        SERVER,
        o.OPERATOR_SET_PASSWORD,
    ),
    Command(
        ("operator", "remove"),
        "remove a console operator (their console sessions end)",
        _h("operators", "remove"),
        SERVER,
        (o.OPERATOR_NAME,),
    ),
    Command(
        ("token", "add"),
        "make an API token for the console's JSON API; prints the token once",
        _h("tokens", "add"),
        SERVER,
        o.TOKEN_ADD,
    ),
    Command(("token", "list"), "list API tokens", _h("tokens", "list_"), SERVER, (o.JSON,)),
    Command(
        ("token", "revoke"),
        "revoke an API token (refused within seconds)",
        _h("tokens", "revoke"),
        SERVER,
        (o.TOKEN_NAME,),
    ),
    Command(
        ("submit",),
        "submit a task (or --file F.jsonl), print its id",
        _h("submit", "submit"),
        BASE,
        o.SUBMIT,
    ),
    Command(
        ("task", "show"), "show a task's state", _h("tasks", "show"), SERVER, (o.TASK_ID, o.JSON)
    ),
    Command(
        ("task", "cancel"),
        "cancel a queued or running task",
        _h("submit", "cancel"),
        BASE,
        (o.TASK_ID, o.RUN),
    ),
    Command(("tasks",), "list tasks, newest first", _h("tasks", "list_"), SERVER, o.TASKS),
    Command(
        ("dead-letters", "list"),
        "list callback or message dead letters, newest first",
        _h("deadletters", "list_"),
        SERVER,
        o.DEAD_LIST,
    ),
    Command(
        ("dead-letters", "show"),
        "show one dead letter with its reason and payload",
        _h("deadletters", "show"),
        SERVER,
        o.DEAD_SHOW,
    ),
    Command(
        ("dead-letters", "redrive"),
        "send a dead letter again (callback: into its outbox; message: to its subject)",
        _h("deadletters", "redrive"),
        SERVER,
        o.DEAD_REDRIVE,
    ),
    Command(
        ("bench", "flood"),
        "the midnight flood: N tasks from C clients, per persist mode",
        _h("bench", "flood"),
        EMBEDDED,
        o.BENCH_FLOOD,
    ),
    Command(
        ("bench", "console"),
        "the console's answer times with N rows in the tasks table (p95 per page)",
        _h("bench", "console"),
        EMBEDDED,
        o.BENCH_CONSOLE,
    ),
)

GROUPS = {
    "client": "manage client systems",
    "operator": "manage the console's operator accounts",
    "token": "manage the API tokens of the console's JSON API",
    "task": "one task",
    "dead-letters": "callbacks and messages that could not be delivered or processed",
    "bench": "benchmarks on a private, temporary stack",
}
