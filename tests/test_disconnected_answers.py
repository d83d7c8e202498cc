"""Services keep serving when an answer cannot be sent.

While nats-py is disconnected it buffers publishes; with that buffer full, a
publish raises ``OutboundBufferLimitError``. For a service that is one lost
answer, like one lost on the wire (the asker asks again), never a reason to
stop: not for the IMA, not for an agent sidecar's operator and state handlers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from agents.agent import HypervisorAgent
from agents.service import AgentService
from ima.keys import KeyLayout
from ima.service import ImaService
from ima.store import EtcdStore
from nvo3.servers import NatsServer
from schemas.subjects import Subjects

pytestmark = pytest.mark.integration


@pytest.fixture
async def disconnected(tmp_path: Path) -> AsyncIterator[Any]:
    """A NATS connection whose server just died, with a 16-byte reconnect buffer."""
    server = NatsServer(tmp_path)
    await asyncio.to_thread(server.start)
    gone = asyncio.Event()

    async def on_disconnect() -> None:
        gone.set()

    async def quiet(exc: Exception) -> None:
        del exc

    nc = await nats.connect(server.url, pending_size=16, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.1, disconnected_cb=on_disconnect,
                            error_cb=quiet)
    try:
        await asyncio.to_thread(server.kill)
        async with asyncio.timeout(10):
            await gone.wait()
        yield nc
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)


async def test_the_ima_counts_an_answer_it_cannot_send(
    disconnected: Any, etcd_endpoints: list[str], key_prefix: str, subject_root: str
) -> None:
    subjects = Subjects(subject_root)
    async with EtcdStore(etcd_endpoints) as store:
        ima = ImaService(disconnected, store, layout=KeyLayout(key_prefix), subjects=subjects)
        request = Msg(disconnected, subject=subjects.ima("list"), reply="_INBOX.x", data=b"{}")
        await ima.handle(request)  # the etcd part works; only the answer is lost
    assert ima.counters["replies_dropped"] == 1


async def test_an_agent_sidecar_counts_an_answer_it_cannot_send(
    disconnected: Any, subject_root: str
) -> None:
    subjects = Subjects(subject_root)
    svc = AgentService(HypervisorAgent("hv1", "nve1", disconnected, subjects=subjects))
    state = Msg(disconnected, subject=subjects.agent_state("hv1"), reply="_INBOX.y", data=b"")
    await svc._answer(state, b"{}" * 32)  # more than the buffer holds
    assert svc.counters["replies_dropped"] == 1
