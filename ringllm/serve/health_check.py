"""`ringllm health`: asks a running `ringllm serve` for GET /health, using that server's own options (read
from its command line and environment in /proc), so that a container HEALTHCHECK follows --port,
RINGLLM_PORT, --ssl-certfile and --api-key however they were given. Exit status 0 when /health answers 200."""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
from pathlib import Path

from ringllm.serve.options import read_environment
from ringllm.serve.parser import build_parser


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def _is_serve(argv: list[str]) -> bool:
    return "serve" in argv and any(a.endswith("ringllm") or a == "ringllm" for a in argv[: argv.index("serve")])


def find_server(pid: int | None) -> int | None:
    """`pid` if given, else PID 1 when it is `ringllm serve` (a container), else the oldest such process."""
    if pid is not None:
        return pid
    candidates = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for p in candidates:
        try:
            if _is_serve(_argv(p)):
                return p
        except OSError:
            continue
    return None


def server_options(pid: int) -> argparse.Namespace:
    """The options `ringllm serve` runs with in process `pid`, parsed the way it parsed them."""
    argv = _argv(pid)
    parser = build_parser()
    read_environment(parser, _environ(pid))
    return parser.parse_args(argv[argv.index("serve") :])


def probe(opts: argparse.Namespace, timeout: float) -> tuple[int, str]:
    """(status, body) of GET /health on the server described by `opts`."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(opts.host, opts.host)
    if opts.ssl_certfile:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its own certificate, any name
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, opts.port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(host, opts.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    try:
        conn.request("GET", "/health", headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def cmd_health(args: argparse.Namespace) -> int:
    pid = find_server(args.pid)
    if pid is None or not _is_serve(_argv(pid)):
        print("unhealthy: no `ringllm serve` process found" + (f" (pid {pid} is not one)" if pid else ""))
        return 1
    try:
        status, body = probe(server_options(pid), args.timeout)
    except (OSError, http.client.HTTPException, SystemExit) as e:
        print(f"unhealthy: {type(e).__name__}: {e}")
        return 1
    print("healthy" if status == 200 else f"unhealthy: /health answered {status} {body[:200]}")
    return 0 if status == 200 else 1
