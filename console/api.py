"""The console's JSON API under /api/v1, and its OpenAPI document at /schema.

Everything the pages show or do, for scripts and machines, plus task submission over HTTP for
client systems that cannot speak NATS (`api_tasks`). Authentication and scopes: `api_auth`;
errors: `api_errors`.

`/schema` (and `/schema/openapi.json`) serve the document Litestar generates from the routes'
types, without a login: it describes the API's shapes, which the README and the code state
anyway, and holds no data; a client system generating its bindings needs no credential to
read it. Only the JSON is served: the documentation UIs Litestar offers load their scripts
from CDNs, which the console neither reaches offline nor allows (its CSP).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Final

from litestar import Router
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from tidegate.console import api_clients, api_ops, api_retry, api_tasks, deadmessages
from tidegate.console.api_errors import HANDLERS
from tidegate.console.security import API_V1

SCHEMA_PATH: Final = "/schema"
BEARER: Final = "apiToken"


def api_router() -> Router:
    return Router(
        path=API_V1,
        route_handlers=[
            *api_tasks.ROUTES,
            *api_retry.ROUTES,
            *api_clients.ROUTES,
            *api_ops.ROUTES,
            *deadmessages.API_ROUTES,
        ],
        exception_handlers=HANDLERS,
        security=[{BEARER: []}],
    )


def _version() -> str:
    try:
        return version("tidegate")
    except PackageNotFoundError:  # run from a tree that is not installed
        return "0"


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Tidegate console API",
        version=_version(),
        description=(
            "Send `Authorization: Bearer <token>` (tokens are made with `tidegate token add`). "
            "A client's token may submit, read and cancel its own client's tasks; an operator's "
            "token may do what an operator does in the console; a viewer's token reads. "
            'Errors are `{"error": "<reason>"}`.'
        ),
        path=SCHEMA_PATH,
        render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"])],
        components=Components(
            security_schemes={
                BEARER: SecurityScheme(
                    type="http", scheme="bearer", description="an API token (tg_…)"
                )
            }
        ),
    )
