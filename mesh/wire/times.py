"""The times wire messages carry, and the bounds a decoded time must lie within."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final


def now() -> datetime:
    return datetime.now(UTC)


# The times events and heartbeats carry come from the clocks of drivers and executors (`now()`).
# One outside these bounds is a broken clock or a forged message, and near datetime's own limits
# (year 1 or 9999) arithmetic overflows: the UTC day of a partition, the shift of an offset to
# UTC. Generous on purpose (a replay of an old stream, a clock years off, must still decode) yet
# centuries away from any overflow.
EARLIEST_TIME: Final = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_TIME: Final = datetime(2200, 1, 1, tzinfo=UTC)


def check_time(name: str, value: datetime | None) -> None:
    """Refuse (ValueError: a validation error when decoding) a time that is naive, whose
    offset cannot be applied, or that lies outside `EARLIEST_TIME`..`LATEST_TIME`."""
    if value is None:
        return
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"`{name}` {value.isoformat()} has no time zone offset")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"`{name}` {value.isoformat()} is out of range") from None
    if not EARLIEST_TIME <= utc < LATEST_TIME:
        raise ValueError(
            f"`{name}` {value.isoformat()} is out of range "
            f"({EARLIEST_TIME.year} to {LATEST_TIME.year - 1})"
        )
