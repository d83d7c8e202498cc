"""A TCP proxy that can lose one answer: the request reaches the server, the reply does not.

That is the ambiguous failure every client of a replicated store must handle (a
leader that commits and dies before answering): the caller cannot know whether
its write was applied. Tests arm the proxy, make one call, and check what the
client did with the ambiguity.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class CutProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; ``arm()`` loses the next reply."""

    def __init__(self, target_host: str, target_port: int, *, linger_s: float = 0.3) -> None:
        self.target = (target_host, target_port)
        self.linger_s = linger_s  # keep swallowing this long, so the server surely committed
        self.port = 0
        self.cuts = 0
        self.forwarded_while_armed = 0  # request bytes that reached the server while armed
        self._armed = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self) -> None:
        self._armed = True
        self.forwarded_while_armed = 0

    async def __aenter__(self) -> CutProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()  # the handlers see their streams end and return
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._up(reader, up_writer))
                tg.create_task(self._down(up_reader, writer, up_writer))
        except* (OSError, ConnectionError, _Cut):
            pass
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    async def _up(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        async for chunk in _chunks(reader):
            if self._armed:
                self.forwarded_while_armed += len(chunk)
            up.write(chunk)
            await up.drain()
        raise _Cut

    async def _down(self, up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_writer: asyncio.StreamWriter) -> None:
        async for chunk in _chunks(up_reader):
            if self._armed and self.forwarded_while_armed:
                # The request went up; its answer is lost, and so is the connection.
                await asyncio.sleep(self.linger_s)
                self._armed = False
                self.cuts += 1
                raise _Cut
            writer.write(chunk)
            await writer.drain()
        raise _Cut


class _Cut(Exception):
    pass


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        with contextlib.suppress(ConnectionError):
            chunk = await reader.read(65536)
            if chunk:
                yield chunk
                continue
        return
