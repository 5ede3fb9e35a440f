"""CORS for browser clients: off unless `--allowed-origins` is given (the serve parent passes it to the API
workers as RINGLLM_ALLOWED_ORIGINS). Litestar's CORSConfig answers OPTIONS preflights with the
Access-Control-* headers and adds them to the actual responses; X-Request-Id is exposed to scripts."""

from __future__ import annotations

import os

from litestar.config.cors import CORSConfig

from ringllm.app.options import comma_list


def cors_config(env=os.environ) -> CORSConfig | None:
    origins = comma_list(env.get("RINGLLM_ALLOWED_ORIGINS", ""))
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins, allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-Id"], max_age=600
    )
