"""Gradio's queue on a public Space: at most ``PACKFORCING_JOBS_PER_CLIENT`` generations per client
address, checked when a request joins the queue, and Stop for a run still waiting in it.

Every REST call is a fresh Gradio session, so the cap is per client *address*: the TCP peer, or
behind ``PACKFORCING_TRUSTED_PROXIES`` proxies (a Space has one) the ``X-Forwarded-For`` entry
the outermost trusted proxy wrote (entries to its left are whatever the client sent). The count
is read from Gradio's own queue (waiting and active events), so a run that ends, fails or is
cancelled frees its place at once. This is the one module that reads Gradio's queue.
"""

from __future__ import annotations

import collections
import logging

from .. import safety

log = logging.getLogger("packforcing.studio")

GENERATION = "generation"  # the concurrency id Generate and Compare share
STOPPED_TITLE = "Stopped"
STOPPED_QUEUED = "Stopped before it started: the run was still waiting in the queue; nothing was generated."


def client_address(request, trusted_proxies: int | None = None) -> str:
    """The address a request comes from (``request``: a Starlette/FastAPI or Gradio request)."""
    hops = safety.trusted_proxies() if trusted_proxies is None else trusted_proxies
    client = getattr(request, "client", None)
    peer = getattr(client, "host", None) or "unknown"
    if hops <= 0:
        return peer
    headers = getattr(request, "headers", None)
    get_all = getattr(headers, "getlist", None) or getattr(headers, "get_list", None)  # Starlette / httpx
    values = get_all("x-forwarded-for") if get_all is not None else []
    hosts = [h.strip() for value in values for h in value.split(",") if h.strip()]
    return hosts[-hops] if len(hosts) >= hops else peer


def too_many_message(held: int, limit: int) -> str:
    return (f"Too many generations from this address: {held} already queued or running (at most {limit} per "
            f"client, {safety.JOBS_PER_CLIENT_ENV}). Wait for one to finish, or stop it, then try again.")


class ClientLimit:
    """Caps the generations each client address has in ``blocks``' queue (``install`` wraps its ``push``)."""

    def __init__(self, blocks, concurrency_id: str = GENERATION):
        self.blocks = blocks
        self.concurrency_id = concurrency_id
        self._joining: collections.Counter[str] = collections.Counter()  # requests inside push right now

    def _events(self):
        queue = self.blocks._queue
        waiting = queue.event_queue_per_concurrency_id.get(self.concurrency_id)
        yield from (waiting.queue if waiting is not None else [])
        for job in list(queue.active_jobs):
            yield from (e for e in (job or []) if e.fn.concurrency_id == self.concurrency_id)

    def held(self, address: str) -> int:
        """Generations of ``address`` waiting, running or joining now."""
        return self._joining[address] + sum(1 for e in self._events() if client_address(e.request) == address)

    def install(self) -> ClientLimit:
        from fastapi import HTTPException

        queue = self.blocks._queue
        original = queue.push

        async def push(body, request, username):
            fn = self.blocks.fns.get(body.fn_index) if body.fn_index is not None else None
            if fn is None or fn.concurrency_id != self.concurrency_id:
                return await original(body, request, username)
            address, limit = client_address(request), safety.jobs_per_client()
            held = self.held(address)  # counted and reserved with no await in between: no race
            if held >= limit:
                log.info("refused a generation from %s: %d queued or running", address, held)
                raise HTTPException(status_code=429, detail=too_many_message(held, limit))
            self._joining[address] += 1
            try:
                return await original(body, request, username)
            finally:
                self._joining[address] -= 1
                if self._joining[address] <= 0:
                    del self._joining[address]

        queue.push = push
        return self


async def stop_queued(blocks, session: str, concurrency_id: str = GENERATION) -> int:
    """Take the session's generations still waiting in ``blocks``' queue out of it, ending each with
    a "Stopped" error (what Gradio's own cancel does for a waiting event); returns how many."""
    from gradio.exceptions import Error
    from gradio.server_messages import ProcessCompletedMessage
    from gradio.utils import error_payload

    queue = blocks._queue
    waiting = queue.event_queue_per_concurrency_id.get(concurrency_id)
    events = [e for e in (waiting.queue if waiting is not None else []) if e.session_hash == session]
    for event in events:
        await queue.remove_from_queue(event._id)
        content = error_payload(Error(STOPPED_QUEUED, title=STOPPED_TITLE), True)
        queue.send_message(event, ProcessCompletedMessage(output=content, title=STOPPED_TITLE, success=False))
    return len(events)
