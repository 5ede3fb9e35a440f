"""Two ASGI layers vLLM's server options add around the app: `--root-path` (the routes are served under a
prefix as well, as behind a proxy that does not strip it) and `--enable-server-load-tracking` (the requests in
flight that GET /load reports)."""

from __future__ import annotations

# The routes that count as load, as vLLM's @load_aware_call marks them: those that run the model.
LOAD_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/invocations"})


class ServedUnder:
    """Serves every route at `root` + its path too: the prefix moves from the path to the scope's root_path,
    so that routing, the API key's public routes and the load count see the route's own path."""

    def __init__(self, app, root: str):
        self.app, self.root = app, "/" + root.strip("/")

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] in ("http", "websocket") and (path == self.root or path.startswith(self.root + "/")):
            scope = dict(scope, path=path[len(self.root) :] or "/", root_path=scope.get("root_path", "") + self.root)
            if "raw_path" in scope and scope["raw_path"] is not None:
                scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


class ServerLoad:
    """Counts this API worker's requests to LOAD_ROUTES from their start until their response (a stream
    included) has been sent or abandoned. vLLM counts per API server process; with --workers N each worker
    counts its own, as there."""

    def __init__(self):
        self.app = None
        self.in_flight = 0

    def wrap(self, app) -> ServerLoad:
        """This layer around `app` (the app's /load route holds the layer, so it is made first)."""
        self.app = app
        return self

    async def __call__(self, scope, receive, send):
        assert self.app is not None, "ServerLoad.wrap(app) first"
        if scope["type"] != "http" or scope.get("path") not in LOAD_ROUTES:
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
