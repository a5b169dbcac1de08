"""Read-only routes: GET /dynfuse/v1/version and GET /dynfuse/v1/schema (the alwayson_scripts args format)."""

from __future__ import annotations

from typing import Any

PREFIX = "/dynfuse/v1"


def add_routes(demo: Any, app: Any) -> None:
    """on_app_started callback; demo is None in API-only mode (--nowebui) and is not used."""
    from lib_dynfuse import __version__
    from lib_dynfuse.settings import json_schema

    @app.get(f"{PREFIX}/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get(f"{PREFIX}/schema")
    async def schema() -> dict:
        return json_schema()
