"""`tidegate bench flood`: the midnight flood against a private stack, once per persist mode.

For each mode it starts its own nats-server and PostgreSQL (fresh data directories), one driver
and E executors as real processes, publishes N `/bin/true` tasks from C clients at once, and
measures what the design is about: how fast the flood is accepted (PubAcks), how long until
every task is terminal in the database, and how many transactions the database committed.

Beside them, in the same run: the raw ceilings (`ceilings`: spawn and reap of the same command,
pipelined JetStream publish of as many messages), so every figure is also a ratio; a callback
receiver (`sink`) with a configurable latency for a share of sensitive and non-sensitive
clients; peak RSS and CPU per component (`usage`); and the backlog of every stage over time
(`timeline`, also the progress line).

The modules: `model` (config and result structs), `stack` (the private servers and processes),
`measure` (commit counter, poller, table statistics; what the figures are worth), `committs`
(every write commit's exact time, from PostgreSQL's commit timestamps), `figures`
(percentiles, ratios, lags: pure), `flood` (one mode's run), `run` (ceilings, every mode,
cleanup), `report` (table, markdown, JSON) and `plot` (the PNG, with the optional `bench`
extra); the command line is `tidegate.cli.bench`. `bench/peers/` (outside the package) runs
the same flood through Celery.
"""

from tidegate.bench.flood import client_names, flood_specs
from tidegate.bench.measure import peak_rate
from tidegate.bench.model import MODES, BenchError, FloodConfig, FloodReport, ModeResult
from tidegate.bench.report import format_table
from tidegate.bench.run import run_flood, run_mode

__all__ = [
    "MODES",
    "BenchError",
    "FloodConfig",
    "FloodReport",
    "ModeResult",
    "client_names",
    "flood_specs",
    "format_table",
    "peak_rate",
    "run_flood",
    "run_mode",
]
