"""The Studio's HTTP edge on a public Space: an ASGI middleware (`SpaceGuard`, given to Gradio as
``launch(app_kwargs={"middleware": ...})``) that

- closes ``/gradio_api/process_recording`` (no input records media: nothing is handed to ffmpeg
  outside the queue) and, when ``PACKFORCING_UPLOADS=0``, ``/gradio_api/upload`` too; otherwise the
  upload route serves the Replay tab's trace and video, each at most ``max_file_size``
  (``PACKFORCING_MAX_UPLOAD_MB``), stored in Gradio's cache (counted by the disk cap) and read only
  by the replay handler, which checks them (`packforcing.studio.replay`);
- notes which sessions hold a keep-alive (heartbeat) connection, so that `release_streams` can free
  the preview segments Gradio keeps for a run whose client cannot fetch them later (a REST caller
  has no heartbeat, and Gradio frees a session's streams only when its heartbeat closes).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading

API_PREFIX = "/gradio_api"
UPLOAD_ROUTE = f"{API_PREFIX}/upload"
RECORDING_ROUTE = f"{API_PREFIX}/process_recording"
HEARTBEAT_ROUTE = f"{API_PREFIX}/heartbeat/"
CLOSED_MESSAGE = "File uploads are closed on this Space: the Replay tab replays the shipped examples only."
RECORDING_MESSAGE = "Media recording is closed on this Space: no input of the Studio records media."


def closed_routes() -> dict[str, str]:
    """Route -> the message of its 403."""
    from .. import safety

    routes = {RECORDING_ROUTE: RECORDING_MESSAGE}
    if not safety.uploads_enabled():
        routes[UPLOAD_ROUTE] = CLOSED_MESSAGE
    return routes


class Heartbeats:
    """Sessions with an open heartbeat connection (counted: a page may reconnect before the old one closes)."""

    def __init__(self):
        self._open: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def opened(self, session: str) -> None:
        with self._lock:
            self._open[session] += 1

    def closed(self, session: str) -> None:
        with self._lock:
            self._open[session] -= 1
            if self._open[session] <= 0:
                del self._open[session]

    def __contains__(self, session: str) -> bool:
        with self._lock:
            return session in self._open


HEARTBEATS = Heartbeats()
_LOOP_ATTR = "packforcing_loop"  # on the app's state: the event loop serving it


def _route(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


class SpaceGuard:
    """ASGI middleware: closed upload routes and heartbeat bookkeeping (see the module docstring)."""

    def __init__(self, app, heartbeats: Heartbeats = HEARTBEATS):
        self.app = app
        self.heartbeats = heartbeats
        self.closed = closed_routes()  # read once, when the app starts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        served = scope.get("app")
        if served is not None and not hasattr(served.state, _LOOP_ATTR):
            setattr(served.state, _LOOP_ATTR, asyncio.get_running_loop())
        route = _route(scope)
        if route in self.closed:
            return await _refuse(send, 403, self.closed[route])
        if route.startswith(HEARTBEAT_ROUTE):
            session = route[len(HEARTBEAT_ROUTE):]
            self.heartbeats.opened(session)
            try:
                return await self.app(scope, receive, send)
            finally:
                self.heartbeats.closed(session)
        return await self.app(scope, receive, send)


async def _refuse(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def launch_kwargs() -> dict:
    """The guard's ``demo.launch`` arguments, a fresh dict each time (Gradio writes into
    ``app_kwargs``): this middleware, and ``max_file_size`` from ``PACKFORCING_MAX_UPLOAD_MB``."""
    from starlette.middleware import Middleware

    from .. import safety

    return {"max_file_size": safety.max_upload_bytes(), "app_kwargs": {"middleware": [Middleware(SpaceGuard)]}}


def _end_session_streams(blocks, session: str) -> None:
    """What Gradio does when a heartbeat closes: end and drop the session's media streams."""
    for run in blocks.pending_streams.pop(session, {}).values():
        for stream in run.values():
            stream.end_stream()


def release_streams(request, heartbeats: Heartbeats = HEARTBEATS) -> bool:
    """At the end of a run: free the preview segments Gradio holds for ``request``'s session unless
    the session has a heartbeat (a page still playing the preview; Gradio frees those when it
    closes). Runs on the server's event loop. True when a release was scheduled."""
    session = getattr(request, "session_hash", None)
    served = getattr(getattr(request, "request", None), "app", None)
    if not session or served is None or session in heartbeats:
        return False
    loop = getattr(served.state, _LOOP_ATTR, None)
    blocks = served.get_blocks() if hasattr(served, "get_blocks") else None
    if loop is None or blocks is None or loop.is_closed():
        return False
    loop.call_soon_threadsafe(_end_session_streams, blocks, session)
    return True
