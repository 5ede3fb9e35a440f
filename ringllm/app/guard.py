"""The checks every request passes before any route sees it, as one ASGI middleware: the API key first (so an
unauthenticated client learns nothing from validation errors, and the OpenAPI document under /schema is
guarded like every other route), after the Host header (DNS rebinding: a web page whose name resolves to
127.0.0.1 must not drive a local server: only localhost names, IP addresses, the --host name and
--allowed-hosts are answered), then the Content-Type of a body (JSON only: a web page cannot post a
"simple" text/plain or form body to a local server without a CORS preflight)."""

from __future__ import annotations

import hmac
import ipaddress

from ringllm.app.errors import ApiError


def guard(app, api_key: str | None, public_routes: set[str], allowed_hosts: list[str]):
    """Litestar middleware factory: wraps the route's ASGI app."""
    hosts = {h.lower().rstrip(".") for h in allowed_hosts}

    async def middleware(scope, receive, send):
        if scope["type"] == "http":
            headers = _headers(scope)
            check_host(headers.get(b"host"), hosts)
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


def check_host(value: bytes | None, allowed: set[str]) -> None:
    """A rebinding attack needs a name of the attacker's: IP addresses and localhost names are always answered,
    other names only when allowed ("*": any). A request without Host (HTTP/1.0) came from no browser."""
    if value is None or "*" in allowed:
        return
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):  # [IPv6]:port
        name = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # name:port
        name = text.partition(":")[0]
    else:  # a name, or a bare IPv6 address
        name = text
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in allowed or _is_address(name):
        return
    raise ApiError(
        421,
        f"the Host header {text!r} names no address of this server (DNS rebinding protection); start it with "
        f"--allowed-hosts {name} to answer that name",
        param="host",
    )


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
