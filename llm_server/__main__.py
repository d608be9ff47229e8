"""`python -m llm_server`: serve one causal language model over gRPC."""

from __future__ import annotations

import asyncio
import sys

import grpc

from llm_server.engine import LlmEngine, LlmEngineConfig
from llm_server.servicer import LlmServicer
from llm_server.settings import LlmSettings
from scriptreel.llm.v1 import llm_service_pb2, llm_service_pb2_grpc
from serving.model_main import EngineSlot, configure_allocator, configure_logging, serve_model
from serving.settings import load_settings
from vram.sizes import parse_bytes

SERVICE = llm_service_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name
# A token reaches its client through three threads (the scheduler, the request's worker, the event
# loop), each waiting for the GIL while another runs Python; Python's default 5 ms switch interval
# can be paid at each hand-off. On an H200, 0.5 ms took the time to the first token of a 512-token
# prompt from 38.4 to 30.6 ms (p50) and 16 streams from 2,183 to 2,250 tokens/s (docs/BENCHMARKS.md).
GIL_SWITCH_INTERVAL_S = 0.0005


def engine_config(settings: LlmSettings) -> LlmEngineConfig:
    """The engine's configuration from the server's settings."""
    return LlmEngineConfig(
        model_dir=settings.model_dir,
        device=settings.device,
        policy=settings.policy(),
        trust_remote_code=settings.trust_remote_code,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_context_tokens=settings.max_context_tokens or None,
        prefill_chunk=settings.prefill_chunk,
        cuda_graphs=settings.cuda_graphs,
        fuse_kernels=settings.fuse_kernels,
        overlap_steps=settings.overlap_steps,
        release_cache_above=parse_bytes(settings.release_cache_above) or 0,
        min_free=parse_bytes(settings.min_free) or 0,
    )


def register(server: grpc.aio.Server) -> EngineSlot[LlmEngine]:
    """Add the LLM servicer; it answers UNAVAILABLE until the engine is attached."""
    slot: EngineSlot[LlmEngine] = EngineSlot("llm")
    llm_service_pb2_grpc.add_LlmServiceServicer_to_server(LlmServicer(slot), server)
    return slot


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    settings = load_settings(LlmSettings, argv if argv is not None else sys.argv[1:])
    configure_logging(settings.log_level)
    configure_allocator()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    config = engine_config(settings)
    return asyncio.run(serve_model(settings, "llm", [SERVICE], lambda: LlmEngine.load(config), register))


if __name__ == "__main__":
    sys.exit(main())
