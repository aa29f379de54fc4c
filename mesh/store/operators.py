"""Operator accounts and the audit log: who may use the console, and who did what.

Passwords are argon2id hashes (argon2-cffi); the clear text is never stored or logged. Every
change to an account writes its audit line in the same transaction, so the log cannot miss a
change that happened. Hashing is slow on purpose (tens of milliseconds of CPU), so it runs in
a worker thread: a console serving pages must not stall while someone logs in.

The SQL is in `console.sql`; the functions take a `Store` and use only its public helpers.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from typing import Any, Final, Literal, Protocol, get_args

import msgspec
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from tidegate.errors import StoreError, UsageError
from tidegate.store.queries import Q
from tidegate.store.store import Params, Store

Role = Literal["viewer", "operator"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
# The operators table's CHECK, so a bad name is refused with a reason before any SQL.
USERNAME_RE: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MIN_PASSWORD_LENGTH: Final = 12
MAX_PASSWORD_LENGTH: Final = 1024  # argon2 takes any length; this bounds the work per login
# An audit line is best effort next to the change it records: never wait long for it.
AUDIT_TIMEOUT_S: Final = 5.0
AUDIT_MAX_LIMIT: Final = 1000

# argon2-cffi's defaults are RFC 9106's low-memory profile (argon2id, 64 MiB, 3 passes). An
# immutable parameter set, like a compiled pattern, not shared state.
HASHER: Final = PasswordHasher()


class UnknownOperator(UsageError):
    """No operator has that username; `tidegate operator list` shows who exists."""


class OperatorExists(UsageError):
    """An operator with that username exists already."""


class OperatorRecord(msgspec.Struct, frozen=True, kw_only=True):
    username: str
    role: Role
    created_at: datetime
    updated_at: datetime


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    username: str
    role: Role
    password_hash: str


class RosterEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What a live session is checked against: the role now, and a tag of the password."""

    username: str
    role: Role
    tag: str


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]


class _Executes(Protocol):
    """A `Store`, or a `Session` inside `Store.transaction`."""

    async def execute(self, query: str, params: Params | None = None) -> int: ...


# --- input ---------------------------------------------------------------------------------------


def check_username(username: str) -> str:
    if not re.match(USERNAME_RE, username):
        raise UsageError(
            f"operator name {username!r} is not valid: 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return username


def check_role(role: str) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise UsageError(f"unknown role {role!r}; one of {', '.join(ROLES)}")


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsageError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UsageError(f"a password has at most {MAX_PASSWORD_LENGTH} characters")
    return password


def generate_password() -> str:
    """24 URL-safe characters (144 random bits): typed once, then kept in a password manager."""
    return secrets.token_urlsafe(18)


# --- hashes --------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with weaker parameters than `HASHER`'s current ones."""
    try:
        return HASHER.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


@cache
def _decoy_hash() -> str:
    return hash_password(secrets.token_urlsafe(18))


def verify_decoy(password: str) -> bool:
    """The work of a real check, for a username that does not exist: an unknown name must not
    answer faster than a wrong password, or the timing tells which names exist."""
    verify_password(_decoy_hash(), password)
    return False


def credential_tag(password_hash: str) -> str:
    """The roster's `tag` (md5 of the hash in SQL): it changes whenever the password does."""
    return hashlib.md5(password_hash.encode(), usedforsecurity=False).hexdigest()


# --- accounts ------------------------------------------------------------------------------------


async def add_operator(
    store: Store, *, username: str, password: str, role: str, actor: str
) -> OperatorRecord:
    check_username(username)
    valid_role = check_role(role)
    password_hash = await asyncio.to_thread(hash_password, check_password(password))
    params = {"username": username, "password_hash": password_hash, "role": valid_role}
    async with store.transaction(what=f"add operator {username!r}") as tx:
        row = await tx.fetch_one(Q.operator_add, params)
        if row is None:
            raise OperatorExists(
                f"operator {username!r} already exists; change its password with "
                f"`tidegate operator set-password {username}`"
            )
        await _record(tx, actor, "operator.add", username, {"role": valid_role})
    return msgspec.convert(row, OperatorRecord)


async def add_first_operator(
    store: Store, *, username: str, password: str, role: str, actor: str
) -> OperatorRecord | None:
    """Add the operator only if there is no operator at all; None if there was one."""
    check_username(username)
    valid_role = check_role(role)
    password_hash = await asyncio.to_thread(hash_password, check_password(password))
    params = {"username": username, "password_hash": password_hash, "role": valid_role}
    async with store.transaction(what="add the first operator") as tx:
        row = await tx.fetch_one(Q.operator_add_first, params)
        if row is None:
            return None
        await _record(tx, actor, "operator.add", username, {"role": valid_role, "first": True})
    return msgspec.convert(row, OperatorRecord)


async def get_credentials(store: Store, username: str) -> Credentials | None:
    row = await store.fetch_one(
        Q.operator_get, {"username": username}, what=f"look up operator {username!r}"
    )
    return None if row is None else msgspec.convert(row, Credentials)


async def list_operators(store: Store) -> list[OperatorRecord]:
    rows = await store.fetch_all(Q.operator_list, what="list operators")
    return [msgspec.convert(r, OperatorRecord) for r in rows]


async def roster(store: Store) -> list[RosterEntry]:
    rows = await store.fetch_all(Q.operator_roster, what="read the operator roster")
    return [msgspec.convert(r, RosterEntry) for r in rows]


async def set_password(store: Store, *, username: str, password: str, actor: str) -> Credentials:
    """Replace an operator's password; returns the new credentials."""
    password_hash = await asyncio.to_thread(hash_password, check_password(password))
    params = {"username": username, "password_hash": password_hash}
    async with store.transaction(what=f"set the password of {username!r}") as tx:
        row = await tx.fetch_one(Q.operator_set_password, params)
        if row is None:
            raise _unknown(username)
        await _record(tx, actor, "operator.set-password", username, None)
    return Credentials(username=username, role=row["role"], password_hash=password_hash)


async def rehash_password(store: Store, *, username: str, password: str) -> None:
    """Store a fresh hash of a password that just verified (after `HASHER` got stronger).

    Not audited: the password is the same, only its hash's parameters changed."""
    password_hash = await asyncio.to_thread(hash_password, password)
    await store.execute(
        Q.operator_set_password,
        {"username": username, "password_hash": password_hash},
        what=f"rehash the password of {username!r}",
    )


async def remove_operator(store: Store, *, username: str, actor: str) -> None:
    async with store.transaction(what=f"remove operator {username!r}") as tx:
        row = await tx.fetch_one(Q.operator_remove, {"username": username})
        if row is None:
            raise _unknown(username)
        await _record(tx, actor, "operator.remove", username, None)


def _unknown(username: str) -> UnknownOperator:
    return UnknownOperator(f"no operator named {username!r}; see `tidegate operator list`")


# --- the audit log -------------------------------------------------------------------------------


def _params(actor: str, action: str, target: str, details: Mapping[str, Any] | None) -> Params:
    # enc_hook=str: a detail of an odd type (a Path, a set) is written as text, not refused.
    encoded = msgspec.json.encode(dict(details or {}), enc_hook=str).decode()
    return {"actor": actor, "action": action, "target": target, "details": encoded}


async def _record(
    db: _Executes, actor: str, action: str, target: str, details: Mapping[str, Any] | None
) -> None:
    await db.execute(Q.audit_record, _params(actor, action, target, details))


async def record_in(
    tx: _Executes,
    *,
    actor: str,
    action: str,
    target: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    """`record_action` inside the caller's transaction: the line commits with the change it
    records, or neither does."""
    await _record(tx, actor, action, target, details)


async def record_action(
    store: Store,
    *,
    actor: str,
    action: str,
    target: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append one line to the audit log: `actor` (a username, or "cli") did `action` (e.g.
    "client.set") to `target`. Raises StoreError if the database does not take it within
    `AUDIT_TIMEOUT_S`; callers log that and carry on, as the change itself is made."""
    try:
        await asyncio.wait_for(
            store.execute(
                Q.audit_record, _params(actor, action, target, details), what="record an action"
            ),
            AUDIT_TIMEOUT_S,
        )
    except TimeoutError:
        raise StoreError(
            f"record an action: the database did not answer within {AUDIT_TIMEOUT_S:.0f}s"
        ) from None


async def list_actions(
    store: Store, *, limit: int, before_id: int | None = None
) -> list[AuditEntry]:
    """Audit lines newest first; `before_id` (the last id of a previous page) pages on."""
    if not 1 <= limit <= AUDIT_MAX_LIMIT:
        raise UsageError(f"limit must be 1 to {AUDIT_MAX_LIMIT}, not {limit}")
    if before_id is None:
        rows = await store.fetch_all(Q.audit_list, {"limit": limit}, what="list actions")
    else:
        rows = await store.fetch_all(
            Q.audit_list_before, {"limit": limit, "before_id": before_id}, what="list actions"
        )
    return [msgspec.convert(r, AuditEntry) for r in rows]
