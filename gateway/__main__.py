"""`python -m gateway`: run the gateway server."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.auth import bearer_token_check
from gateway.pipeline import Pipeline
from gateway.servicer import GatewayServicer
from gateway.settings import GatewaySettings
from gateway.upstreams import Upstreams
from scriptreel.gateway.v1 import gateway_service_pb2, gateway_service_pb2_grpc
from serving.server import GrpcServer
from serving.settings import load_settings
from serving.streams import Admission

SERVICE = gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


async def serve(settings: GatewaySettings) -> None:
    """Start the gateway and serve until drained."""
    refusal = bearer_token_check(settings.auth_token) if settings.auth_token else None
    server = GrpcServer(settings, "gateway", [SERVICE], extra_refusal=refusal)
    upstreams = Upstreams(settings)
    pipeline = Pipeline(settings, upstreams)
    servicer = GatewayServicer(pipeline, upstreams, Admission("gateway", settings.max_queue))
    gateway_service_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server.server)
    server.install_signal_handlers()
    await server.start()
    await server.set_serving()  # the gateway holds no model: ready once listening
    await server.wait_for_termination()
    await upstreams.close()
    pipeline.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    settings = load_settings(GatewaySettings, argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
