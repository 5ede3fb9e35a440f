"""The checks every request passes before any route sees it, as one ASGI middleware: the API key first (so an
unauthenticated client learns nothing from validation errors, and the OpenAPI document under /schema is
guarded like every other route), then the Content-Type of a body (JSON only: a web page cannot post a
"simple" text/plain or form body to a local server without a CORS preflight)."""

from __future__ import annotations

import hmac

from ringllm.app.errors import ApiError


def guard(app, api_key: str | None, public_routes: set[str]):
    """Litestar middleware factory: wraps the route's ASGI app."""

    async def middleware(scope, receive, send):
        if scope["type"] == "http":
            headers = _headers(scope)
            check_api_key(api_key, public_routes, scope["path"], headers.get(b"authorization"))
            if _has_body(headers):
                check_json_content_type(headers.get(b"content-type"))
        await app(scope, receive, send)

    return middleware


def _headers(scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope["headers"]}  # ASGI servers send names lower-case; be sure


def check_api_key(key: str | None, public_routes: set[str], path: str, given: bytes | None) -> None:
    """`Authorization: Bearer KEY` (the scheme in any case, as RFC 9110 says) on every route but the public
    ones; the key is compared in constant time."""
    if key is None or path in public_routes:
        return
    scheme, _, token = (given or b"").decode("latin-1").strip().partition(" ")
    ok = hmac.compare_digest(token.strip().encode(), key.encode())
    if scheme.lower() != "bearer" or not ok:
        raise ApiError(401, "invalid or missing API key", "authentication_error")


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


def check_json_content_type(value: bytes | None) -> None:
    media = (value or b"").split(b";")[0].strip().lower()
    if media != b"application/json":
        got = repr(value.decode("latin-1")) if value else "none"
        raise ApiError(415, f"request bodies must be Content-Type application/json, got {got}", param="content-type")
