"""The gRPC server scaffolding shared by all three servers.

`GrpcServer` wires a grpc.aio server with the status interceptor, the standard health service
(NOT_SERVING until `set_serving()`, NOT_SERVING again while draining), server reflection, TLS when
configured, the /metrics listener, and a graceful drain on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import errors
from serving.metrics import QUEUE_CAPACITY, SERVING, serve_metrics
from serving.settings import ServerSettings
from serving.status import StatusInterceptor
from serving.tls import server_credentials

log = logging.getLogger(__name__)

Refusal = Callable[[str, grpc.aio.ServicerContext], BaseException | None]


class GrpcServer:
    """One grpc.aio server with health, reflection, metrics and drain.

    Args:
        settings: The server's settings (address, TLS, grace, metrics port).
        name: Short name of the server for metrics and logs ("llm", "video", "gateway").
        service_names: Full names of the services it serves (for health and reflection).
        extra_refusal: Another check run before every RPC (the gateway's bearer token).

    Usage: construct, register servicers on `.server`, `await start()`, load the model,
    `set_serving()`, then `await wait_for_termination()`.
    """

    def __init__(
        self,
        settings: ServerSettings,
        name: str,
        service_names: Sequence[str],
        extra_refusal: Refusal | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.service_names = list(service_names)
        self.draining = False
        self._extra_refusal = extra_refusal
        self._stopped = asyncio.Event()
        self.server = grpc.aio.server(
            interceptors=[StatusInterceptor(self._refuse)],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 16 * 2**20)],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        QUEUE_CAPACITY.labels(name).set(settings.max_queue)
        SERVING.labels(name).set(0)
        self.port = 0
        self.metrics_port = -1

    def _refuse(self, path: str, context: grpc.aio.ServicerContext) -> BaseException | None:
        if self.draining:
            return errors.NotReady(f"{self.name} server is shutting down; retry on another replica")
        return self._extra_refusal(path, context) if self._extra_refusal else None

    async def start(self) -> int:
        """Bind the listeners and start serving (health NOT_SERVING). Returns the gRPC port."""
        creds = server_credentials(self.settings)
        if creds is None:
            self.port = self.server.add_insecure_port(self.settings.address)
        else:
            self.port = self.server.add_secure_port(self.settings.address, creds)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.settings.address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.metrics_port = serve_metrics(self.settings.metrics_host, self.settings.metrics_port)
        log.info(
            "%s server listening on %s:%d (%s), metrics on %s:%d",
            self.name,
            self.settings.host,
            self.port,
            "tls" if creds else "plaintext",
            self.settings.metrics_host,
            self.metrics_port,
        )
        return self.port

    async def set_serving(self) -> None:
        """Mark every service SERVING (call after the model is loaded and warmed up)."""
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        SERVING.labels(self.name).set(1)
        log.info("%s server SERVING", self.name)

    async def _set_health(self, status: int) -> None:
        for service in ["", *self.service_names]:
            await self.health.set(service, status)

    def install_signal_handlers(self) -> None:
        """Drain on SIGTERM and SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._drain_task = asyncio.ensure_future(self.drain(sig.name))

    async def drain(self, reason: str = "stop") -> None:
        """NOT_SERVING, refuse new work, let in-flight work finish within the grace period, stop."""
        if self.draining:
            return
        self.draining = True
        SERVING.labels(self.name).set(0)
        log.info("%s: draining (%s), grace %.0fs", self.name, reason, self.settings.grace_seconds)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_seconds)
        log.info("%s server stopped", self.name)
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        """Return once the server has drained and stopped."""
        await self._stopped.wait()
