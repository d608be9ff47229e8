"""Run blocking model work off the event loop, with bounded admission and prompt cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

from serving.errors import ResourceExhausted
from serving.metrics import QUEUE_DEPTH

T = TypeVar("T")
_DONE = object()


class Admission:
    """A bounded count of requests in a server (running + waiting); full -> RESOURCE_EXHAUSTED.

    Args:
        name: The server's name (metrics label).
        capacity: Requests admitted at once.
        retry_after_s: Advice sent with RESOURCE_EXHAUSTED.
    """

    def __init__(self, name: str, capacity: int, retry_after_s: float = 1.0) -> None:
        self.name = name
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self._count = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a request."""
        if self._count >= self.capacity:
            raise ResourceExhausted(
                f"{self.name} server is at capacity ({self.capacity} requests); retry later",
                retry_after_s=self.retry_after_s,
            )
        self._count += 1
        QUEUE_DEPTH.labels(self.name).set(self._count)
        try:
            yield
        finally:
            self._count -= 1
            QUEUE_DEPTH.labels(self.name).set(self._count)


async def iterate_in_thread(
    produce: Callable[[Callable[[], bool]], Iterator[T]],
    lock: threading.Lock | None = None,
) -> AsyncIterator[T]:
    """Iterate a blocking generator in its own thread and yield its items on the event loop.

    Args:
        produce: Called in the worker thread with `should_stop`; returns the generator to drain.
            `should_stop()` turns true as soon as the consumer goes away (client cancelled, deadline
            passed, server stopping), so the work can stop at its next step.
        lock: Held by the worker while it runs (serialises work on one model).

    Exceptions raised by the generator are re-raised here, in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    stop = threading.Event()

    def put(item: object) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed: nobody listens any more
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            with lock if lock is not None else contextlib.nullcontext():
                if stop.is_set():
                    return
                for item in produce(stop.is_set):
                    put(item)
                    if stop.is_set():
                        break
        except BaseException as exc:
            put(_Raised(exc))
        finally:
            put(_DONE)

    thread = threading.Thread(target=work, name="model-work", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
