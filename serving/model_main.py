"""The start-up sequence of a model server, shared by llm_server and video_server.

Listen first (health NOT_SERVING, so probes and clients see the server loading), load and warm up
the model off the event loop, then turn SERVING. A plan that cannot run (PlanError) or a model that
cannot load ends the process with a clear message and exit code 2: never a silent downgrade.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc

from serving.errors import NotReady
from serving.server import GrpcServer
from serving.settings import ServerSettings
from vram.plan import PlanError

log = logging.getLogger(__name__)
E = TypeVar("E")


class EngineSlot(Generic[E]):
    """Where a servicer finds its engine; until the model is loaded, calls get UNAVAILABLE."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._engine: E | None = None

    def set(self, engine: E) -> None:
        """Attach the loaded engine."""
        self._engine = engine

    def get(self) -> E:
        """The engine, or NotReady while loading."""
        if self._engine is None:
            raise NotReady(f"{self.name} model is still loading")
        return self._engine


async def serve_model(
    settings: ServerSettings,
    name: str,
    service_names: Sequence[str],
    load: Callable[[], E],
    register: Callable[[grpc.aio.Server], EngineSlot[E]],
) -> int:
    """Run a model server until drained; returns the process exit code.

    Args:
        settings: The server's settings.
        name: "llm" or "video".
        service_names: Full names of its gRPC services.
        load: Loads and warms up the engine (runs in a worker thread).
        register: Adds the servicers to the server and returns the slot they read the engine from.
    """
    server = GrpcServer(settings, name, service_names)
    slot = register(server.server)
    server.install_signal_handlers()
    await server.start()
    try:
        engine = await asyncio.to_thread(load)
    except PlanError as exc:
        log.error("%s server refuses to start: %s", name, exc)
        await server.drain("plan refused")
        return 2
    except Exception:
        log.exception("%s server could not load its model", name)
        await server.drain("load failed")
        return 2
    if server.draining:  # SIGTERM while loading
        return 0
    monitor = getattr(engine, "monitor", None)
    if monitor is not None:
        monitor.register_gauges()
    slot.set(engine)
    await server.set_serving()
    await server.wait_for_termination()
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    return 0


def configure_allocator() -> None:
    """Use PyTorch's expandable segments unless the operator chose otherwise.

    With fixed-size segments, activations of varying shapes (VAE decode chunks, growing KV caches)
    fragment the cache: on an H200 the SVD-XT pipeline reserved twice what it allocated. Budgets cap
    reserved memory, so fragmentation would waste them. Must run before the first CUDA allocation.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def configure_logging(level: str) -> None:
    """One log format for all servers."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
