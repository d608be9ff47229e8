"""The whole pipeline through real gRPC on loopback, with the tiny models."""

from __future__ import annotations

import io

import av
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.llm.v1 import llm_service_pb2 as llm_pb
from scriptreel.video.v1 import video_service_pb2 as video_pb
from tests.integration.helpers import field_violations, scrape


def decode_mp4(data: bytes) -> tuple[int, int, int, str]:
    """(frames, width, height, codec) of an mp4, decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return len(frames), frames[0].width, frames[0].height, stream.codec_context.name


def test_create_video_yields_script_and_a_decodable_mp4(gateway):
    request = gw.CreateVideoRequest(
        brief="a 20-second teaser for a mountain bike",
        num_scenes=2,
        video=gw.VideoParameters(width=64, height=48, num_frames=6, fps=6, num_inference_steps=2, seed=7),
    )
    events = list(gateway.CreateVideo(request, timeout=300))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "script" and kinds[-1] == "summary"
    script = events[0].script
    assert len(script.scenes) == 2 and all(s.narration and s.visual_prompt for s in script.scenes)
    denoise = [
        e.progress
        for e in events
        if kinds and e.WhichOneof("event") == "progress" and e.progress.stage == "denoise"
    ]
    assert [(p.scene, p.step) for p in denoise] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    data = b"".join(e.chunk.data for e in events if e.WhichOneof("event") == "chunk")
    frames, width, height, codec = decode_mp4(data)
    assert (frames, width, height, codec) == (12, 64, 48, "h264")
    summary = events[-1].summary
    assert (summary.num_frames, summary.width, summary.height, summary.size_bytes) == (12, 64, 48, len(data))
    assert [t.stage for t in summary.timings] == ["script", "scene-0", "scene-1", "join"]
    assert {u.server for u in summary.upstreams} == {"llm", "video"}


def test_write_script_is_always_well_formed(gateway):
    reply = gateway.WriteScript(
        gw.WriteScriptRequest(brief="a cat on a skateboard", num_scenes=4), timeout=120
    )
    assert len(reply.script.scenes) == 4
    assert [s.index for s in reply.script.scenes] == [0, 1, 2, 3]
    assert reply.script.title


def test_generate_streams_deltas_and_reports_usage(llm):
    request = llm_pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=12, temperature=0, seed=1)
    messages = list(llm.Generate(request, timeout=60))
    assert len(messages) > 1
    last = messages[-1]
    assert last.usage.completion_tokens >= 1 and last.usage.prompt_tokens > 0
    assert last.finish_reason != llm_pb.FINISH_REASON_UNSPECIFIED
    assert last.memory.device == "cpu" and last.memory.weights_bytes > 0
    again = list(llm.Generate(request, timeout=60))
    assert "".join(m.text for m in again) == "".join(m.text for m in messages)  # greedy is deterministic


def test_status_shows_every_upstream(gateway):
    reply = gateway.GetStatus(gw.GetStatusRequest(), timeout=30)
    by_name = {u.server: u for u in reply.upstreams}
    assert set(by_name) == {"llm", "video"}
    for up in by_name.values():
        assert up.health == "SERVING" and not up.error
        assert up.info.plan.precision == "fp32" and up.info.memory.weights_bytes > 0
    assert by_name["llm"].info.architecture == "GlmForCausalLM"
    assert by_name["video"].info.architecture == "StableVideoDiffusionPipeline"


def test_every_server_is_serving_with_reflection(channels):
    for name, channel in channels.items():
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


@pytest.mark.parametrize(
    ("server", "request_", "fields"),
    [
        ("llm", llm_pb.GenerateRequest(prompt=""), {"prompt"}),
        ("llm", llm_pb.GenerateRequest(prompt="word " * 5000), {"prompt"}),
        ("llm", llm_pb.GenerateRequest(prompt="hi", temperature=5, top_p=3), {"temperature", "top_p"}),
        ("video", video_pb.GenerateVideoRequest(image=b"not an image"), {"image"}),
        ("video", video_pb.GenerateVideoRequest(width=63, height=100000), {"width", "height"}),
        ("gateway", gw.WriteScriptRequest(brief=""), {"brief"}),
        ("gateway", gw.CreateVideoRequest(brief="x", num_scenes=99), {"num_scenes"}),
        ("gateway", gw.CreateVideoRequest(brief="x", image=b"\x89PNG broken"), {"image"}),
        ("gateway", gw.CreateVideoRequest(brief="x", video=gw.VideoParameters(width=30)), {"video.width"}),
    ],
)
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(
    server, request_, fields, llm, video, gateway, channels
):
    call = {
        "llm": lambda r: list(llm.Generate(r, timeout=30)),
        "video": lambda r: list(video.GenerateVideo(r, timeout=30)),
        "gateway": lambda r: (
            gateway.WriteScript(r, timeout=30)
            if isinstance(r, gw.WriteScriptRequest)
            else list(gateway.CreateVideo(r, timeout=30))
        ),
    }[server]
    with pytest.raises(grpc.RpcError) as info:
        call(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert fields <= set(field_violations(info.value)), info.value.details()
    health = health_pb2_grpc.HealthStub(channels[server]).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoints_answer_with_the_model_gauges(stack, llm):
    list(llm.Generate(llm_pb.GenerateRequest(prompt="hello", max_new_tokens=3), timeout=60))
    for name in ("gateway", "llm", "video"):
        samples = scrape(stack.ports[name][1])
        assert samples["scriptreel_server_serving"][0][1] == 1.0
    llm_samples = scrape(stack.ports["llm"][1])
    ok = [
        v
        for labels, v in llm_samples["scriptreel_rpc_requests_total"]
        if labels["method"] == "Generate" and labels["code"] == "OK"
    ]
    assert ok and ok[0] >= 1
    for name in ("llm", "video"):
        samples = scrape(stack.ports[name][1])
        ((labels, value),) = samples["scriptreel_model_weights_bytes"]
        assert labels["precision"] == "fp32" and value > 0
        ((info_labels, info_value),) = samples["scriptreel_model_info"]
        assert info_value == 1 and info_labels["precision"] == "fp32"
        ((gpu_labels, allocated),) = samples["scriptreel_gpu_memory_allocated_bytes"]
        assert gpu_labels["device"] == "cpu" and allocated == 0  # no GPU: zero, never invented


def _tensor_bytes(modules) -> int:
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_weights_gauge_equals_the_sum_of_parameter_and_buffer_bytes(stack, models_dir):
    import torch
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models_dir / "llm", dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(models_dir / "svd", dtype=torch.float32)
    expected = {
        "llm": _tensor_bytes([model]),
        "video": _tensor_bytes([c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]),
    }
    for name, value in expected.items():
        ((_, scraped),) = scrape(stack.ports[name][1])["scriptreel_model_weights_bytes"]
        assert scraped == value, name
