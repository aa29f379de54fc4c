"""Encoding: every wire message is a msgspec struct written as JSON."""

from __future__ import annotations

import msgspec
from msgspec import Struct


def encode(msg: Struct) -> bytes:
    return msgspec.json.encode(msg)
