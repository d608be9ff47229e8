"""Shutdown: on SIGTERM a server turns NOT_SERVING, refuses new work, finishes what it started, exits 0.

One stack; each test drains one of its servers during a long request (the gateway first, while the
model servers it needs are still up).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.stack import LocalStack
from media.keyframe import render_keyframe
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from scriptreel.llm.v1 import llm_service_pb2 as llm_pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2 as video_pb
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc

pytestmark = pytest.mark.timeout(240)

LONG_TOKENS = 1900  # greedy decoding of the tiny GLM runs to the limit: about 2 s
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., LocalStack]) -> Iterator[LocalStack]:
    stack = start_stack(
        "shutdown",
        extra_env={
            "llm": {"SCRIPTREEL_LLM_MAX_NEW_TOKENS_LIMIT": str(LONG_TOKENS)},
            "gateway": {"SCRIPTREEL_GATEWAY_SCRIPT_MAX_NEW_TOKENS": "64"},
        },
    )
    yield stack
    assert stack.stop() == {"gateway": 0, "llm": 0, "video": 0}  # each exited 0 after its drain


Start = Callable[[grpc.Channel], Iterator]
Refused = Callable[[grpc.Channel], object]


def drain_during(stack: LocalStack, name: str, start: Start, new_request: Refused) -> list:
    """SIGTERM `name` while `start`'s stream runs; return the rest of that stream.

    Shows, in order: health turns NOT_SERVING, a new request on the same connection and one on a new
    connection are refused with UNAVAILABLE, the running request completes, the process exits 0.
    """
    server = stack.servers[name]
    assert server.process is not None
    with server.channel() as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == SERVING
        running = start(channel)
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # a watch is a call in flight too: the drain would wait for it
        with server.channel() as fresh:
            for client in (channel, fresh):
                with pytest.raises(grpc.RpcError) as info:
                    new_request(client)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
                print(f"{name} draining, new request refused: UNAVAILABLE {info.value.details()!r}")
        rest = list(running)
    assert server.process.wait(30) == 0
    return rest


def test_gateway_drains_a_create_video(stack):
    request = gw.CreateVideoRequest(
        brief="a paper plane",
        num_scenes=1,
        video=gw.VideoParameters(width=64, height=64, num_frames=8, num_inference_steps=60, seed=2),
    )

    def start(channel: grpc.Channel) -> Iterator:
        call = gw_grpc.GatewayServiceStub(channel).CreateVideo(request, timeout=120)
        assert next(call).WhichOneof("event") == "script"
        return call

    def new_request(channel: grpc.Channel) -> object:
        return gw_grpc.GatewayServiceStub(channel).WriteScript(gw.WriteScriptRequest(brief="x"), timeout=10)

    rest = drain_during(stack, "gateway", start, new_request)
    assert rest[-1].summary.num_frames == 8
    assert rest[-1].summary.size_bytes == sum(
        len(e.chunk.data) for e in rest if e.WhichOneof("event") == "chunk"
    )


def test_llm_server_drains_a_long_generation(stack):
    long = llm_pb.GenerateRequest(prompt="hello", max_new_tokens=LONG_TOKENS, temperature=0)

    def start(channel: grpc.Channel) -> Iterator:
        call = llm_grpc.LlmServiceStub(channel).Generate(long, timeout=120)
        next(call)
        return call

    def new_request(channel: grpc.Channel) -> object:
        short = llm_pb.GenerateRequest(prompt="hi", max_new_tokens=2)
        return list(llm_grpc.LlmServiceStub(channel).Generate(short, timeout=10))

    rest = drain_during(stack, "llm", start, new_request)
    assert rest[-1].finish_reason == llm_pb.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == LONG_TOKENS


def test_video_server_drains_a_long_generation(stack):
    image = render_keyframe("a paper plane", 64, 64)
    long = video_pb.GenerateVideoRequest(
        image=image, width=64, height=64, num_frames=8, num_inference_steps=80, seed=4
    )

    def start(channel: grpc.Channel) -> Iterator:
        call = video_grpc.VideoServiceStub(channel).GenerateVideo(long, timeout=120)
        assert next(call).progress.step == 1
        return call

    def new_request(channel: grpc.Channel) -> object:
        short = video_pb.GenerateVideoRequest(image=image, width=16, height=16, num_inference_steps=1)
        return list(video_grpc.VideoServiceStub(channel).GenerateVideo(short, timeout=10))

    rest = drain_during(stack, "video", start, new_request)
    steps = [
        e.progress.step for e in rest if e.WhichOneof("event") == "progress" and e.progress.stage == "denoise"
    ]
    assert steps[-1] == 80
    assert rest[-1].result.num_frames == 8
