"""`tidegate up`: the whole system on one machine, on embedded servers, until Ctrl-C.

It starts nats-server and PostgreSQL from their wheels (unless `TIDEGATE_NATS_URL` /
`TIDEGATE_DATABASE_URL` name running servers), applies the migrations, registers the `demo`
client, and runs a driver, executors and the console as supervised child processes. Everything
it starts can be found again from the data directory, so a run that was killed with SIGKILL is
cleaned up by the next `tidegate up` on the same directory.

Layout of the data directory:

    endpoints.json      the addresses (read by the other commands), removed on a clean stop
    run/<name>.pid      each child's pid; run/up.lock is held while `up` runs
    logs/<name>.log     each child's output (executors also keep task logs here)
    nats/, pg/          the embedded servers' state; nats/auth.conf, users.json and
                        credentials.json: the NATS users (embedded/natsauth.py), one per
                        component kind, the operator (endpoints.json's nats_url) and `demo`
    operator.json       the console login `up` generated for its first operator (private)

The modules: `prepare` (checks, schema, `demo` client), `login` (the first operator),
`servers`, `supervisor` (the component processes), `demo`, `announce` (endpoints.json, the
banner) and `run`, which ties them together.
"""

from tidegate.up.demo import DEMO_CLIENT, demo_loop
from tidegate.up.prepare import UpError, prepare
from tidegate.up.run import Up, run_up

__all__ = [
    "DEMO_CLIENT",
    "Up",
    "UpError",
    "demo_loop",
    "prepare",
    "run_up",
]
