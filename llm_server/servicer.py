"""LlmService: translates messages to engine calls and back. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from llm_server.engine import Finished, GenerationRequest, LlmEngine
from scriptreel.llm.v1 import llm_service_pb2 as pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as pb_grpc
from serving.convert import memory_pb, model_info_pb
from serving.model_main import EngineSlot
from serving.streams import iterate_in_thread

FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
}


class LlmServicer(pb_grpc.LlmServiceServicer):
    """The LLM server's RPCs."""

    def __init__(self, slot: EngineSlot[LlmEngine]) -> None:
        self.slot = slot

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a completion."""
        engine = self.slot.get()
        prepared = engine.validate(
            GenerationRequest(
                prompt=request.prompt,
                messages=[(m.role, m.content) for m in request.messages],
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=request.seed,
                stop=list(request.stop),
                json_schema=request.json_schema,
            )
        )
        async for event in iterate_in_thread(lambda should_stop: engine.generate(prepared, should_stop)):
            if isinstance(event, Finished):
                yield pb.GenerateResponse(
                    finish_reason=FINISH[event.finish_reason],
                    usage=pb.Usage(
                        prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens
                    ),
                    memory=memory_pb(event.memory),
                )
            else:
                yield pb.GenerateResponse(text=event.text)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """Describe the model, plan and memory."""
        engine = self.slot.get()
        return pb.GetModelInfoResponse(
            info=model_info_pb(engine), max_context_tokens=engine.max_context_tokens
        )
