"""One configured PACS node: its association pool and the DIMSE services on it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import anyio
import anyio.abc

from gateway.config import NodeSettings, Settings
from gateway.tls import receiver_context, tls_for_node

from .breaker import CircuitBreaker
from .find import FindService
from .net import Peer
from .pool import AssociationPool, Capabilities
from .receiver import MoveReceiver
from .retrieve import Retriever


def peer_for(node: NodeSettings, calling_ae: str) -> Peer:
    t = node.timeouts
    return Peer(
        name=node.name,
        ae_title=node.ae_title,
        host=node.host,
        port=node.port,
        max_pdu=node.max_pdu,
        connect_timeout=t.connect,
        acse_timeout=t.acse,
        dimse_timeout=t.dimse,
        calling_ae=calling_ae,
        tls=tls_for_node(node),
    )


class NodeClient:
    def __init__(self, settings: NodeSettings, calling_ae: str, task_group: anyio.abc.TaskGroup,
                 receiver: MoveReceiver | None) -> None:
        self.settings = settings
        self.name = settings.name
        self.pool = AssociationPool(
            peer_for(settings, calling_ae),
            max_associations=settings.max_associations,
            acquire_timeout=settings.acquire_timeout,
            idle_timeout=settings.idle_timeout,
            relational=settings.relational,
            fuzzy=settings.fuzzy,
            task_group=task_group,
            breaker=CircuitBreaker(settings.name, settings.breaker_threshold, settings.breaker_cooldown),
        )
        self.queries = FindService(self.pool, settings.retries)
        self.retriever = Retriever(self.pool, settings.retrieve, receiver, calling_ae)

    async def capabilities(self) -> Capabilities:
        """What the node accepted on its last query association; a C-ECHO opens one if none was."""
        if self.pool.last_capabilities is None:
            await self.queries.echo()
        assert self.pool.last_capabilities is not None
        return self.pool.last_capabilities


class Nodes:
    """Every configured node, keyed by name, with the default one at hand."""

    def __init__(self, settings: Settings, task_group: anyio.abc.TaskGroup, receiver: MoveReceiver | None) -> None:
        self.receiver = receiver
        self.by_name = {n.name: NodeClient(n, settings.gateway.ae_title, task_group, receiver) for n in settings.nodes}
        self.default = self.by_name[settings.default_node.name]
        self._tg = task_group

    def get(self, name: str) -> NodeClient | None:
        return self.by_name.get(name)

    async def reap_forever(self, interval: float = 2.0) -> None:
        while True:
            await anyio.sleep(interval)
            for node in self.by_name.values():
                await node.pool.reap_idle()

    async def aclose(self) -> None:
        for node in self.by_name.values():
            await node.pool.aclose()


def wants_receiver(settings: Settings) -> bool:
    """The C-MOVE receiver runs when it has a port and some node may retrieve with C-MOVE."""
    return bool(settings.gateway.move_port) and any(n.retrieve != "get" for n in settings.nodes)


@asynccontextmanager
async def open_nodes(settings: Settings) -> AsyncIterator[Nodes]:
    """Pools for every node, with idle reaping, and the C-MOVE receiver when a node retrieves with
    C-MOVE, for the lifetime of the block."""
    receiver = None
    if wants_receiver(settings):
        g = settings.gateway
        receiver = MoveReceiver(g.ae_title, g.move_host, g.move_port,
                                allowed_calling={n.ae_title for n in settings.nodes},
                                ssl_context=receiver_context(settings))
        await anyio.to_thread.run_sync(receiver.start)
    try:
        async with anyio.create_task_group() as tg:
            nodes = Nodes(settings, tg, receiver)
            tg.start_soon(nodes.reap_forever)
            try:
                yield nodes
            finally:
                with anyio.CancelScope(shield=True):
                    await nodes.aclose()
                tg.cancel_scope.cancel()
    finally:
        if receiver is not None:
            await anyio.to_thread.run_sync(receiver.stop)
