"""The IMA service keeps serving when an answer cannot be sent.

While nats-py is disconnected it buffers publishes; with that buffer full, a
publish raises ``OutboundBufferLimitError``. For the IMA that is one lost answer,
like one lost on the wire (the caller asks again), never a reason to stop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from ima.keys import KeyLayout
from ima.service import ImaService
from ima.store import EtcdStore
from nvo3.servers import NatsServer
from schemas.subjects import Subjects

pytestmark = pytest.mark.integration


async def test_an_answer_that_cannot_be_buffered_is_counted_not_fatal(
    tmp_path: Path, etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    server = NatsServer(tmp_path)
    await asyncio.to_thread(server.start)
    disconnected = asyncio.Event()

    async def on_disconnect() -> None:
        disconnected.set()

    async def quiet(exc: Exception) -> None:
        del exc

    nc = await nats.connect(server.url, pending_size=16, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.1, disconnected_cb=on_disconnect,
                            error_cb=quiet)
    try:
        async with EtcdStore(etcd_endpoints) as store:
            subjects = Subjects(subject_root)
            ima = ImaService(nc, store, layout=KeyLayout(key_prefix), subjects=subjects)
            await asyncio.to_thread(server.kill)
            async with asyncio.timeout(10):
                await disconnected.wait()
            request = Msg(nc, subject=subjects.ima("list"), reply="_INBOX.x",
                          data=b"{}")
            await ima.handle(request)  # the etcd part works; only the answer is lost
            assert ima.counters["replies_dropped"] == 1
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)
