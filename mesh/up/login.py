"""The console login `tidegate up` shows: a first operator, made when there is none.

The database keeps only a hash, so the generated password is kept in `DATA_DIR/operator.json`
(private to its user, like endpoints.json) and shown again by every later `up` on the same
directory, for as long as it still opens the account. Once someone changes that password or
removes the account, `up` shows no password: it never resets one behind an operator's back.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from tidegate.endpoints import (
    OPERATOR_FILE,
    OperatorLogin,
    read_operator_login,
    write_operator_login,
)
from tidegate.store import operators
from tidegate.store.store import Store

log = logging.getLogger("tidegate.up")

FIRST_OPERATOR = "admin"
ACTOR = "up"


async def first_login(store: Store, data_dir: Path) -> OperatorLogin | None:
    """The login to show, creating the first operator if the table is empty; None when the
    operators that exist were made (or changed) by someone else."""
    saved = read_operator_login(data_dir)
    if saved is not None:
        found = await operators.get_credentials(store, saved.username)
        if found is not None and await asyncio.to_thread(
            operators.verify_password, found.password_hash, saved.password
        ):
            return saved
    login = OperatorLogin(username=FIRST_OPERATOR, password=operators.generate_password())
    # Written before the account exists: a crash between the two leaves a file that does
    # not verify (and is replaced next time), never an account whose password nobody has.
    write_operator_login(data_dir, login)
    created = await operators.add_first_operator(
        store, username=login.username, password=login.password, role="operator", actor=ACTOR
    )
    if created is None:
        (data_dir / OPERATOR_FILE).unlink(missing_ok=True)
        return None
    log.info("created the first console operator %r", login.username)
    return login
