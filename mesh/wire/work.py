"""A routed task (`WorkItem`) and its decoder, lenient to a newer driver's spec fields."""

from __future__ import annotations

from datetime import datetime

import msgspec
from msgspec import Struct

from tidegate.wire.spec import SpecOnWire, TaskClass, TaskSpec, plain_spec


class WorkItem(Struct, frozen=True, kw_only=True):
    """A routed task on `tg.work.<pool>.<class>`, everything an executor needs to run it."""

    task_id: str
    client: str
    spec: TaskSpec
    pool: str
    task_class: TaskClass
    submitted_at: datetime
    sensitive: bool = False
    # The run's id: the stream sequence of the submission that started it; later runs have
    # larger ids. 0: from a component that predates runs (their messages still decode).
    run: int = 0


class _WorkItemOnWire(WorkItem, frozen=True, kw_only=True):
    spec: SpecOnWire


_work_decoder = msgspec.json.Decoder(WorkItem)
_lenient_work_decoder = msgspec.json.Decoder(_WorkItemOnWire)


def decode_work_item(data: bytes) -> WorkItem:
    """A ready or work message, whichever version wrote it (fields it does not know are
    skipped), as this version's types. Raises msgspec's errors when it cannot be read."""
    try:
        return _work_decoder.decode(data)  # the common case, at full speed
    except msgspec.ValidationError:
        wire = _lenient_work_decoder.decode(data)  # a newer writer's spec, or truly invalid
    fields = msgspec.structs.asdict(wire)
    fields["spec"] = plain_spec(wire.spec)
    return WorkItem(**fields)
