"""TLS to NATS: one `ssl.SSLContext` per connection, from the TIDEGATE_NATS_TLS_* settings.

Every component connects through `natsconn.connect`, which asks `from_env` here when its caller
gave no context of its own (the SDK may: `TidegateClient.connect(..., tls=ctx)`). nats-py keeps
the context for every reconnect.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping

from nats.aio.client import Client as NATS

from tidegate.config import Connection
from tidegate.errors import ConfigError


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext | None:
    """A client context that verifies the server against `ca` (else the system's CAs) and
    presents `cert`/`key` (mutual TLS) when given; None when neither is set."""
    if not (ca or cert):
        return None
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use the NATS TLS files (TIDEGATE_NATS_TLS_CA={ca!r}, "
            f"TIDEGATE_NATS_TLS_CERT={cert!r}, TIDEGATE_NATS_TLS_KEY={key!r}): {exc}; "
            "give readable PEM files (a CA bundle, a certificate and its private key)"
        ) from None
    return ctx


def from_env(env: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """`tls_context` of the TIDEGATE_NATS_TLS_* variables (checked as `Connection` checks them)."""
    env = os.environ if env is None else env
    conn = Connection(
        nats_tls_ca=env.get("TIDEGATE_NATS_TLS_CA", ""),
        nats_tls_cert=env.get("TIDEGATE_NATS_TLS_CERT", ""),
        nats_tls_key=env.get("TIDEGATE_NATS_TLS_KEY", ""),
    )
    return tls_context(conn.nats_tls_ca, conn.nats_tls_cert, conn.nats_tls_key)


def wants_tls(url: str, ctx: ssl.SSLContext | None) -> bool:
    return ctx is not None or any(u.strip().startswith("tls://") for u in url.split(","))


async def require_tls(nc: NATS, url: str, ctx: ssl.SSLContext | None) -> None:
    """nats-py upgrades to TLS only when the server asks for it: with a server (or someone in
    the middle) that does not, everything would cross in clear text. Refuse to go on."""
    if not wants_tls(url, ctx):
        return
    if not nc._server_info.get("tls_required"):  # nats-py keeps INFO only here
        await nc.close()
        raise ConfigError(
            "TLS to NATS is configured (a tls:// URL or TIDEGATE_NATS_TLS_CA) but the server "
            "did not offer it: enable `tls { … }` in its configuration, or drop the TLS settings"
        )
