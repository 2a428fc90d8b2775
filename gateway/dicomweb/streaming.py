"""A streaming response that treats a client who stops reading as gone.

Starlette's StreamingResponse waits as long as the client lets it. A retrieve cannot: the PACS
waits for each C-STORE answer and gives up after its own timeout. Each chunk here must be taken
by the server within ``stall_timeout``; otherwise the response is aborted, which ends the body
iterator, which cancels the retrieve.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

from gateway.middleware import StreamAborted

log = logging.getLogger("gateway.wado")


def new_boundary() -> str:
    return "dwgw-" + secrets.token_hex(12)


def part_header(boundary: str, content_type: str, length: int, location: str | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}", f"Content-Length: {length}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


class StallGuardedResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], *, stall_timeout: float, status_code: int = 200,
                 media_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, status_code=status_code, media_type=media_type, headers=headers)
        self.stall_timeout = stall_timeout

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        iterator = self.body_iterator
        state = {"sending": False, "since": time.monotonic(), "stalled": False}

        async def watchdog(scope: anyio.CancelScope) -> None:
            # one timer per response instead of a timeout around every chunk
            while True:
                await anyio.sleep(min(1.0, self.stall_timeout / 4))
                if state["sending"] and time.monotonic() - state["since"] > self.stall_timeout:
                    state["stalled"] = True
                    scope.cancel()
                    return

        aborted: StreamAborted | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watchdog, tg.cancel_scope)
                try:
                    async for chunk in iterator:
                        state["sending"], state["since"] = True, time.monotonic()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        state["sending"] = False
                except StreamAborted as exc:  # raised outside the task group, not inside an ExceptionGroup
                    aborted = exc
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()  # its finally blocks cancel the retrieve behind it
        if aborted is not None:
            raise aborted
        if state["stalled"]:
            log.warning("client took no data for %g s; treated as gone, response aborted", self.stall_timeout)
            raise StreamAborted("client stalled")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
