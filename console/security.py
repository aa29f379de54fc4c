"""The console's defences that are not about who you are: CSRF, login throttling, headers.

- CSRF: Litestar's double-submit check (a signed token in the `csrftoken` cookie and the same
  token in the `x-csrftoken` header, which base.html makes htmx send, or the `_csrf_token` form
  field) on every request that is not GET/HEAD/OPTIONS. The signing secret is kept in the data
  directory so that a restarted console accepts the tokens its pages handed out before.
- Throttling: failed logins are counted per username and per client address, in this
  process's memory (see `LoginThrottle`).
- Headers: every response, static files and errors included, forbids framing and sniffing,
  and allows scripts and styles from the console itself only; cookies are marked `Secure`
  when the request came over TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from litestar import MediaType, Request, Response
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.response import Redirect
from litestar.status_codes import HTTP_401_UNAUTHORIZED, HTTP_403_FORBIDDEN
from litestar.types import Message, Scope

log = logging.getLogger(__name__)

CSRF_COOKIE: Final = "csrftoken"
CSRF_HEADER: Final = "x-csrftoken"  # what base.html's hx-headers sends
CSRF_SECRET_FILE: Final = "console-secret"
CSRF_FAILED: Final = (
    "this form is stale or was sent from another site (CSRF check failed): "
    "reload the page and try again"
)

# htmx is served from /static/htmx/ and runs no inline script; hx-headers is parsed as JSON, not
# evaluated, so it works under this policy (hx-on, `js:` values and inline styles do not).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "content-security-policy": CONTENT_SECURITY_POLICY,
}


@dataclass(frozen=True, kw_only=True)
class AccessConfig:
    """The console's access rules; the defaults are the product's, tests shorten them."""

    # An idle session ends after this long (each request restarts the clock).
    session_max_age_s: int = 8 * 3600
    # A client address or a username is refused for the rest of the window after this many
    # failed logins within it.
    login_max_failures: int = 5
    login_window_s: float = 300.0
    # How long a login waits for PostgreSQL before answering 503.
    login_db_timeout_s: float = 5.0
    # How often sessions are checked against the operators table (a removed operator, or a
    # changed password, ends the sessions within this long while the database answers).
    roster_refresh_s: float = 5.0
    # None: kept in DATA_DIR/console-secret (made on first start).
    csrf_secret: str | None = None
    # How long an API token's lookup is trusted: a revoked token is refused within this long.
    token_cache_s: float = 5.0
    # While the database does not answer, a token seen valid within this long still works (so
    # clients keep submitting over HTTP through an outage); an unseen one is refused with 503.
    token_outage_grace_s: float = 3600.0


# --- CSRF ----------------------------------------------------------------------------------------


def csrf_secret(data_dir: Path) -> str:
    """The token-signing secret shared by every start of the console on this data directory."""
    path = data_dir / CSRF_SECRET_FILE
    try:
        return _read_or_create(path)
    except OSError as exc:
        # Still safe; only the tokens of pages served before a restart stop working.
        log.warning(
            "cannot keep the CSRF secret in %s (%s): using one for this run only", path, exc
        )
        return secrets.token_hex(32)


def _read_or_create(path: Path) -> str:
    try:
        text = path.read_text().strip()
        if len(text) >= 32:
            return text
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    try:
        # link() fails if another console made the file first: then theirs is the secret.
        os.link(tmp, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        tmp.unlink(missing_ok=True)
    return secret


def csrf_config(secret: str) -> CSRFConfig:
    # HttpOnly: pages carry the token in their HTML (hx-headers, form fields), so no script
    # needs the cookie. Strict: a cross-site request never carries it.
    return CSRFConfig(
        secret=secret,
        cookie_name=CSRF_COOKIE,
        header_name=CSRF_HEADER,
        cookie_samesite="strict",
        cookie_httponly=True,
    )


def csrf_cookie_valid(token: str, secret: str) -> bool:
    """Litestar's check of a token's signature: a cookie signed by another secret (a console
    that could not keep its secret, restarted) would fail every form until it is replaced."""
    raw, signature = token[:64], token[64:]
    expected = hmac.new(secret.encode(), raw.encode(), hashlib.sha256).hexdigest()
    return len(raw) == 64 and hmac.compare_digest(signature, expected)


# --- login throttling ----------------------------------------------------------------------------


class LoginThrottle:
    """Failed logins per key (a username, a client address) in a sliding window.

    In memory, on purpose: it needs no server, so it works during the outages the console is
    for. The price: a restarted console forgets, and several consoles count apart (N consoles
    allow N times the limit). Enough to make password guessing slow; not a ledger. The number of
    keys is bounded, oldest first out, so a flood of names cannot grow it without end.
    """

    def __init__(
        self,
        *,
        max_failures: int,
        window_s: float,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait_s(self, *keys: str) -> float:
        """Seconds until these keys may try again; 0 when they may now."""
        now = self._clock()
        waits = [0.0]
        for key in keys:
            times = self._failures.get(key)
            if times is None:
                continue
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if not times:
                del self._failures[key]
            elif len(times) >= self.max_failures:
                waits.append(times[0] + self.window_s - now)
        return max(waits)

    def fail(self, *keys: str) -> float:
        """Count one failure against every key; returns the wait it now imposes (0: none)."""
        now = self._clock()
        for key in keys:
            times = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
            times.append(now)
            self._failures[key] = times  # re-inserted: most recent last
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)
        return self.wait_s(*keys)

    def forgive(self, key: str) -> None:
        """A right password clears its username's count (not its address's)."""
        self._failures.pop(key, None)


def too_many_message(wait_s: float) -> str:
    return f"too many failed logins, try again in {max(1, round(wait_s))} s"


# --- response headers ----------------------------------------------------------------------------

_SECURE = re.compile(r";\s*secure\s*(;|$)", re.IGNORECASE)


async def security_headers(message: Message, scope: Scope) -> None:
    """A `before_send` hook: it sees every response, those of routes, static files and errors
    alike (route middleware does not run for a 404)."""
    if message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    for name, value in SECURITY_HEADERS.items():
        if name not in headers:
            headers[name] = value
    if "cache-control" not in headers and not scope["path"].startswith("/static/"):
        # Pages show live state and a logged-out browser's back button must not show them.
        headers["cache-control"] = "no-store"
    if scope.get("scheme") == "https":
        # Over TLS (directly, or behind a proxy uvicorn trusts to say so with
        # X-Forwarded-Proto), no cookie of ours may ever travel in clear text.
        cookies = headers.getall("set-cookie", [])
        if cookies:
            del headers["set-cookie"]
            for cookie in cookies:
                headers.add("set-cookie", cookie if _SECURE.search(cookie) else cookie + "; Secure")


# --- the 401 and 403 answers (app-level exception handlers) ---------------------------------------


API_V1: Final = "/api/v1"
NOT_AUTHENTICATED: Final = (
    "not authenticated: send `Authorization: Bearer <token>` (made with `tidegate token add`), "
    "or log in at /login"
)


class TokenRefused(NotAuthorizedException):
    """An `Authorization` header the API cannot accept; the detail says why."""


def is_api_v1(path: str) -> bool:
    return path == API_V1 or path.startswith(API_V1 + "/")


def _is_api(request: Request[Any, Any, Any]) -> bool:
    return request.url.path.startswith("/api/")


def api_error(
    message: str,
    status: int,
    *,
    headers: dict[str, str] | None = None,
    cookies: list[Cookie] | None = None,
) -> Response[dict[str, str]]:
    """The JSON API's answer to anything it does not do: `{"error": "<the reason>"}`."""
    return Response({"error": message}, status_code=status, headers=headers, cookies=cookies)


def on_not_authorized(
    request: Request[Any, Any, Any], exc: NotAuthorizedException
) -> Response[Any]:
    """No session: JSON 401 under /api/, else to the login page and back here afterwards."""
    if is_api_v1(request.url.path):
        message = exc.detail if isinstance(exc, TokenRefused) else NOT_AUTHENTICATED
        return api_error(message, HTTP_401_UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    if _is_api(request):
        return Response(
            {"status_code": HTTP_401_UNAUTHORIZED, "detail": "not logged in: log in at /login"},
            status_code=HTTP_401_UNAUTHORIZED,
        )
    htmx = request.headers.get("hx-request") == "true"
    here = request.headers.get("hx-current-url", "") if htmx else str(request.url)
    parts = urlsplit(here)
    target = safe_next(parts.path + (f"?{parts.query}" if parts.query else ""))
    login = "/login" if target == "/" else "/login?" + urlencode({"next": target})
    if htmx:  # a fragment request: htmx turns this into a full page load of the login page
        return Response("", status_code=HTTP_401_UNAUTHORIZED, headers={"HX-Redirect": login})
    return Redirect(login, status_code=303)


def on_forbidden(request: Request[Any, Any, Any], exc: PermissionDeniedException) -> Response[Any]:
    message = exc.detail
    cookies: list[Cookie] = []
    if message == "CSRF token verification failed":
        message = CSRF_FAILED
        token = request.cookies.get(CSRF_COOKIE)
        if token and not csrf_cookie_valid(token, request.app.state.csrf_secret):
            # Signed by another secret: drop it, so that reloading the page issues a new one.
            cookies.append(Cookie(key=CSRF_COOKIE, value="", max_age=0, path="/"))
    if is_api_v1(request.url.path):
        return api_error(message, HTTP_403_FORBIDDEN, cookies=cookies)
    if _is_api(request):
        return Response(
            {"status_code": HTTP_403_FORBIDDEN, "detail": message},
            status_code=HTTP_403_FORBIDDEN,
            cookies=cookies,
        )
    return Response(
        message, media_type=MediaType.TEXT, status_code=HTTP_403_FORBIDDEN, cookies=cookies
    )


# --- redirects -----------------------------------------------------------------------------------

_LOCAL_PATH = re.compile(r"^/(?![/\\])[^\s\\]*$")


def safe_next(target: str | None, default: str = "/") -> str:
    """Where to go after login: a path of this console only, never another site's URL."""
    if target and _LOCAL_PATH.match(target) and not target.startswith("/login"):
        return target
    return default
