"""CORS for browser clients: off unless `--allowed-origins` is given (WorkerSettings.allowed_origins).
Litestar's CORSConfig answers OPTIONS preflights with the Access-Control-* headers and adds them to the actual
responses; X-Request-Id is exposed to scripts."""

from __future__ import annotations

from litestar.config.cors import CORSConfig


def cors_config(origins: list[str]) -> CORSConfig | None:
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins, allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-Id"], max_age=600
    )
