"""`tidegate bench flood`: the midnight flood against a private stack, once per persist mode.

For each mode it starts its own nats-server and PostgreSQL (fresh data directories), one driver
and E executors as real processes, publishes N `/bin/true` tasks from C clients at once, and
measures what the design is about: how fast the flood is accepted (PubAcks), how long until
every task is terminal in the database, and how many transactions the database committed.

The modules: `model` (config and result structs), `stack` (the private servers and processes),
`measure` (commit counter, poller, table statistics; what the figures are worth), `flood` (one
mode's run), `run` (every mode, cleanup), `report` (table, JSON) and `cli` (argparse).
"""

from mesh.bench.cli import add_bench_commands, cmd_bench_flood, main
from mesh.bench.flood import client_names, flood_specs
from mesh.bench.measure import peak_rate
from mesh.bench.model import MODES, BenchError, FloodConfig, FloodReport, ModeResult
from mesh.bench.report import format_table
from mesh.bench.run import run_flood, run_mode

__all__ = [
    "MODES", "BenchError", "FloodConfig", "FloodReport", "ModeResult", "add_bench_commands",
    "client_names", "cmd_bench_flood", "flood_specs", "format_table", "main", "peak_rate",
    "run_flood", "run_mode",
]  # fmt: skip
