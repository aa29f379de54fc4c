"""Where callbacks may go: never to loopback, link-local (the cloud metadata address),
private, multicast or otherwise special addresses, unless an operator allows a range
(`TIDEGATE_CALLBACK_ALLOW_NETS`, e.g. `10.20.0.0/16,127.0.0.0/8`).

A client's callback URL is checked when it is set, and again on every connection the driver
opens: the backend below resolves the name itself and connects only to an address it checked,
so a name that resolves differently later (DNS rebinding) cannot smuggle a refused address in.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import httpcore
from httpcore import AsyncNetworkBackend, AsyncNetworkStream
from httpcore._backends.auto import AutoBackend

from tidegate.errors import ConfigError, TidegateError

Net: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


# What `tidegate up`, the benchmark and the tests allow: everything runs on one machine.
LOCAL_CALLBACK_NETS = "127.0.0.0/8"


class CallbackAddressRefused(TidegateError):
    """A callback URL names, or resolves to, an address callbacks may not go to."""


def parse_nets(text: str) -> tuple[Net, ...]:
    """`TIDEGATE_CALLBACK_ALLOW_NETS`: comma-separated CIDR ranges; empty allows none."""
    nets: list[Net] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(
                f"TIDEGATE_CALLBACK_ALLOW_NETS: {part!r} is not an address range "
                "(write it as 10.0.0.0/8 or fd00::/8)"
            ) from None
    return tuple(nets)


def _kind(ip: Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _kind(ip.ipv4_mapped)
    for kind, hit in (
        ("a loopback", ip.is_loopback),
        ("a link-local (cloud metadata)", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("an unspecified", ip.is_unspecified),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
    ):
        if hit:
            return kind
    return None


def refusal(ip: Address, allowed: Sequence[Net]) -> str | None:
    """Why callbacks may not go to `ip`, or None when they may."""
    if any(ip in net for net in allowed):
        return None
    kind = _kind(ip)
    if kind is None:
        return None
    return (
        f"{ip} is {kind} address; callbacks do not go there unless an operator allows its "
        "range (TIDEGATE_CALLBACK_ALLOW_NETS)"
    )


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_addresses(host: str, addresses: Iterable[str], allowed: Sequence[Net]) -> None:
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])  # a zone index is not part of it
        why = refusal(ip, allowed)
        if why is not None:
            shown = host if host == str(ip) else f"{host} resolves to {ip}:"
            raise CallbackAddressRefused(f"callback to {shown} refused: {why}")


def check_url_now(url: str, allowed: Sequence[Net]) -> None:
    """For setting a client's callback URL: the host as written, and what it resolves to now
    (a name that does not resolve is let through: it is checked again at every send)."""
    import httpx  # the driver's and the console's dependency, not the client SDK's

    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as exc:
        raise CallbackAddressRefused(f"callback URL {url!r} is not a URL: {exc}") from None
    literal = _literal(host)
    if literal is not None:
        check_addresses(host, [str(literal)], allowed)
        return
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return
    check_addresses(host, [str(info[4][0]) for info in infos], allowed)


# Set by the sender for the request its task is making: called before every write to the
# socket, and may raise to stop the request before another byte leaves. The notifier's lease
# check sits here, as late as it can be: a driver frozen (SIGSTOP, a VM pause) between its
# check and the write would otherwise send an old state after its successor sent a newer one.
BEFORE_WRITE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "tidegate_before_write", default=None
)


class _GuardedStream(AsyncNetworkStream):
    def __init__(self, inner: AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        check = BEFORE_WRITE.get()
        if check is not None:
            check()
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        inner = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _GuardedStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class CheckedBackend(AsyncNetworkBackend):
    """httpcore's own backend, connecting only to addresses that pass the policy."""

    def __init__(self, allowed: Sequence[Net]) -> None:
        self._allowed = tuple(allowed)
        self._inner = AutoBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        literal = _literal(host)
        if literal is not None:
            candidates = [str(literal)]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
                )
            except (OSError, TimeoutError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
            candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # Every address the name has must pass, not just the one tried first: otherwise a
        # name with one public and one internal address is a coin toss.
        try:
            check_addresses(host, candidates, self._allowed)
        except CallbackAddressRefused as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception | None = None
        for address in candidates:
            try:
                stream = await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
                return _GuardedStream(stream)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise httpcore.ConnectError("callbacks never go to a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
