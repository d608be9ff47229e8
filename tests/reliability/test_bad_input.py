"""Property: whatever a client sends, a server answers OK or INVALID_ARGUMENT, and keeps SERVING.

Hypothesis generates requests for each service, valid and malformed: random unicode text, huge and
negative numbers, NaN and infinities, random bytes and odd images as conditioning images, sizes out of
range. Valid requests are kept tiny (the sizes, frames and steps drawn for them are small) so a run is
fast. Every INVALID_ARGUMENT must carry google.rpc.BadRequest violations naming real request fields;
INTERNAL or UNKNOWN is never an acceptable answer to input. Request bodies that do not even parse (as a
client in another language can send) must be INVALID_ARGUMENT too. Runs are derandomized: the same
examples every time.
"""

from __future__ import annotations

import collections
import io
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from gateway.stack import LocalStack
from scriptreel.gateway.v1 import gateway_service_pb2 as gw
from scriptreel.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from scriptreel.llm.v1 import llm_service_pb2 as llm_pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as llm_grpc
from scriptreel.video.v1 import video_service_pb2 as video_pb
from scriptreel.video.v1 import video_service_pb2_grpc as video_grpc
from tests.integration.helpers import field_violations
from tests.reliability.probes import error_counts, health

pytestmark = pytest.mark.timeout(300)

EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
RPC_TIMEOUT = 60
# The tiny SVD's limits (checked against GetModelInfo below): invalid values are drawn outside them,
# valid ones far inside them, so that no generated request is both valid and slow.
SIZE_MULTIPLE, MAX_SIZE, MAX_FRAMES, MAX_STEPS, MAX_FPS = 8, 256, 25, 200, 60

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOAT32 = st.floats(width=32)  # NaN, infinities and subnormals included
TEXT = st.text(max_size=80)  # any unicode scalar value (protobuf strings cannot hold surrogates)
LONG_TEXT = st.builds(lambda char, count: char * count, st.characters(), st.integers(2001, 2400))
LABEL = st.text(max_size=64)
LONG_LABEL = st.text(min_size=65, max_size=90)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # this mode cannot be written in this format
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


@st.composite
def pictures(draw: st.DrawFn, formats: tuple[str, ...], min_side: int = 1) -> bytes:
    """An encoded image of random pixels, size, mode and format."""
    width, height = draw(st.integers(min_side, 40)), draw(st.integers(min_side, 40))
    pixels = random.Random(draw(st.integers(0, 2**32))).randbytes(width * height * 3)
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "1", "I", "CMYK", "LA"]))
    image = Image.frombytes("RGB", (width, height), pixels).convert(mode)
    return _encode(image, draw(st.sampled_from(formats)))


def _big_pixels_png() -> bytes:
    return _encode(Image.new("L", (4100, 4100)), "PNG")  # small file, too many pixels


GOOD_IMAGES = pictures(("PNG", "JPEG", "WEBP"), min_side=8)
ANY_IMAGES = st.one_of(
    pictures(("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")),
    st.binary(max_size=300),
    st.builds(lambda data, cut: data[:cut], GOOD_IMAGES, st.integers(0, 200)),  # truncated
    st.just(b""),
    st.just(_big_pixels_png()),
    st.just(b"\x89PNG\r\n\x1a\n" + bytes(8 << 20)),  # over the 8 MiB limit
)


def _pick(valid: bool, good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """The field's strategy: small valid values only, or valid and invalid ones mixed."""
    return good if valid else st.one_of(bad, good)


@st.composite
def generate_requests(draw: st.DrawFn) -> llm_pb.GenerateRequest:
    valid = draw(st.booleans())
    request = llm_pb.GenerateRequest()
    use = draw(
        st.sampled_from(["prompt", "messages"] if valid else ["prompt", "messages", "both", "neither"])
    )
    if use in ("prompt", "both"):
        request.prompt = draw(
            _pick(valid, st.text(min_size=1, max_size=200), st.one_of(LONG_TEXT, st.just("word " * 3000)))
        )
    if use in ("messages", "both"):
        roles = _pick(valid, st.sampled_from(["system", "user", "assistant"]), TEXT)
        messages = st.builds(llm_pb.ChatMessage, role=roles, content=TEXT)
        request.messages.extend(draw(st.lists(messages, min_size=1, max_size=4)))
    request.max_new_tokens = draw(_pick(valid, st.integers(0, 12), INT32))
    request.temperature = draw(_pick(valid, st.sampled_from([0.0, 1e-45, 0.7, 2.0]), FLOAT32))
    request.top_p = draw(_pick(valid, st.sampled_from([0.0, 1e-45, 0.5, 1.0]), FLOAT32))
    request.top_k = draw(_pick(valid, st.integers(0, 50), INT32))
    request.seed = draw(INT64)
    request.stop.extend(
        draw(
            _pick(
                valid,
                st.lists(st.text(min_size=1, max_size=64), max_size=8),
                st.lists(st.text(max_size=80), max_size=12),
            )
        )
    )
    schemas = st.sampled_from(["", '{"type": "object"}'])
    bad_schemas = st.one_of(TEXT, st.sampled_from(["[1, 2]", "{", '{"a": "' + "x" * 17000 + '"}']))
    request.json_schema = draw(_pick(valid, schemas, bad_schemas))
    return request


def _sizes(valid: bool) -> st.SearchStrategy:
    bad = INT32.filter(lambda v: v < 0 or v % SIZE_MULTIPLE or v > MAX_SIZE or 0 < v < 16)
    return _pick(valid, st.sampled_from([0, 16, 24, 32]), bad)


@st.composite
def video_requests(draw: st.DrawFn) -> video_pb.GenerateVideoRequest:
    valid = draw(st.booleans())
    return video_pb.GenerateVideoRequest(
        prompt=draw(_pick(valid, TEXT, LONG_TEXT)),
        negative_prompt=draw(_pick(valid, TEXT, LONG_TEXT)),
        image=draw(_pick(valid, GOOD_IMAGES, ANY_IMAGES)),
        width=draw(_sizes(valid)),
        height=draw(_sizes(valid)),
        num_frames=draw(
            _pick(valid, st.sampled_from([0, 1, 2, 3]), INT32.filter(lambda v: not 0 <= v <= MAX_FRAMES))
        ),
        fps=draw(
            _pick(valid, st.sampled_from([0, 1, 7, MAX_FPS]), INT32.filter(lambda v: not 0 <= v <= MAX_FPS))
        ),
        num_inference_steps=draw(
            _pick(valid, st.sampled_from([0, 1, 2]), INT32.filter(lambda v: not 0 <= v <= MAX_STEPS))
        ),
        guidance_scale=draw(_pick(valid, st.floats(0, 50, width=32), FLOAT32)),
        seed=draw(INT64),
    )


def _script_fields(draw: st.DrawFn, valid: bool, scenes: st.SearchStrategy) -> dict[str, Any]:
    brief = st.text(min_size=1, max_size=300).filter(str.strip)
    return {
        "brief": draw(_pick(valid, brief, st.one_of(st.sampled_from(["", "  \n"]), LONG_TEXT, TEXT))),
        "num_scenes": draw(_pick(valid, scenes, INT32.filter(lambda v: not 0 <= v <= 12))),
        "style": draw(_pick(valid, LABEL, LONG_LABEL)),
        "language": draw(_pick(valid, LABEL, LONG_LABEL)),
    }


@st.composite
def write_script_requests(draw: st.DrawFn) -> gw.WriteScriptRequest:
    return gw.WriteScriptRequest(**_script_fields(draw, draw(st.booleans()), st.integers(0, 12)))


@st.composite
def create_video_requests(draw: st.DrawFn) -> gw.CreateVideoRequest:
    valid = draw(st.booleans())
    video = gw.VideoParameters(
        width=draw(_sizes(valid)),
        height=draw(_sizes(valid)),
        num_frames=draw(
            _pick(valid, st.sampled_from([0, 1, 2]), INT32.filter(lambda v: not 0 <= v <= MAX_FRAMES))
        ),
        fps=draw(_pick(valid, st.sampled_from([0, 8]), INT32.filter(lambda v: not 0 <= v <= MAX_FPS))),
        num_inference_steps=draw(
            _pick(valid, st.sampled_from([1, 2]), INT32.filter(lambda v: not 0 <= v <= MAX_STEPS))
        ),
        seed=draw(INT64),
    )
    image = draw(st.one_of(st.just(b""), _pick(valid, GOOD_IMAGES, ANY_IMAGES)))
    fields = _script_fields(draw, valid, st.sampled_from([1, 2]))
    return gw.CreateVideoRequest(**fields, image=image, video=video)


# -- the property ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., LocalStack]) -> Iterator[LocalStack]:
    # Short scripts keep the many valid WriteScript/CreateVideo examples fast.
    stack = start_stack(
        "bad-input", extra_env={"gateway": {"SCRIPTREEL_GATEWAY_SCRIPT_MAX_NEW_TOKENS": "64"}}
    )
    yield stack
    assert error_counts(stack) == {"gateway": 0, "llm": 0, "video": 0}


@pytest.fixture(scope="module")
def channels(stack: LocalStack) -> Iterator[dict[str, grpc.Channel]]:
    chans = {name: server.channel() for name, server in stack.servers.items()}
    yield chans
    for channel in chans.values():
        channel.close()


@pytest.fixture(scope="module")
def models_info(channels: dict[str, grpc.Channel]) -> video_pb.GetModelInfoResponse:
    """The video server's limits; the strategies above assume the tiny SVD's."""
    info = video_grpc.VideoServiceStub(channels["video"]).GetModelInfo(
        video_pb.GetModelInfoRequest(), timeout=10
    )
    assert (info.size_multiple, info.max_width, info.max_height, info.max_num_frames) == (
        SIZE_MULTIPLE,
        MAX_SIZE,
        MAX_SIZE,
        MAX_FRAMES,
    )
    return info


class Outcomes:
    """Checks each answer and counts the codes seen."""

    def __init__(self, channels: dict[str, grpc.Channel]) -> None:
        self.channels = channels
        self.codes: collections.Counter[str] = collections.Counter()

    def check(self, servers: tuple[str, ...], request: Message, call: Callable[[], object]) -> object:
        """Run `call`; it must succeed or fail with INVALID_ARGUMENT naming real fields of `request`."""
        result = None
        try:
            result = call()
            self.codes["OK"] += 1
        except grpc.RpcError as error:
            code = error.code()
            self.codes[code.name] += 1
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (
                f"{code.name}: {error.details()}\n{_short(request)}"
            )
            fields = set(request.DESCRIPTOR.fields_by_name)
            violations = field_violations(error)
            assert violations, f"INVALID_ARGUMENT without field violations: {error.details()}"
            for name in violations:
                assert re.split(r"[.\[]", name)[0] in fields, f"violation on unknown field {name!r}"
        for server in servers:
            assert health(self.channels[server]) == "SERVING", server
        return result

    def assert_mixed(self) -> None:
        """Both valid and malformed requests were exercised."""
        print(f"outcomes: {dict(self.codes)}")
        assert self.codes["OK"] >= 3 and self.codes["INVALID_ARGUMENT"] >= 3, dict(self.codes)


def _short(request: Message) -> str:
    text = str(request)
    return text if len(text) < 2000 else text[:2000] + "..."


def test_llm_generate_answers_ok_or_invalid_argument(stack, channels):
    stub = llm_grpc.LlmServiceStub(channels["llm"])
    outcomes = Outcomes(channels)

    @EXAMPLES
    @given(request=generate_requests())
    # Found by this test: a subnormal temperature made every score infinite and the draw fail (INTERNAL).
    @example(request=llm_pb.GenerateRequest(prompt="hi", max_new_tokens=4, temperature=1e-45, seed=3))
    @example(request=llm_pb.GenerateRequest(prompt="hi", temperature=float("nan"), top_p=float("inf")))
    def check(request: llm_pb.GenerateRequest) -> None:
        messages = outcomes.check(
            ("llm",), request, lambda: list(stub.Generate(request, timeout=RPC_TIMEOUT))
        )
        if messages:
            last = messages[-1]
            assert last.finish_reason != llm_pb.FINISH_REASON_UNSPECIFIED
            assert 1 <= last.usage.completion_tokens <= (request.max_new_tokens or 256)

    check()
    outcomes.assert_mixed()


def test_video_generate_answers_ok_or_invalid_argument(stack, channels, models_info):
    stub = video_grpc.VideoServiceStub(channels["video"])
    outcomes = Outcomes(channels)
    tiny_png = _encode(Image.new("RGB", (1, 1)), "PNG")

    @EXAMPLES
    @given(request=video_requests())
    # Found by this test (INTERNAL before the fixes): a 1x1 conditioning image, an 8x8 video (one latent
    # cell) and a one-frame SVD video.
    @example(
        request=video_pb.GenerateVideoRequest(image=tiny_png, width=16, height=16, num_inference_steps=1)
    )
    @example(
        request=video_pb.GenerateVideoRequest(
            image=_encode(Image.new("RGB", (16, 16)), "PNG"),
            width=8,
            height=8,
            num_frames=1,
            num_inference_steps=1,
        )
    )
    def check(request: video_pb.GenerateVideoRequest) -> None:
        events = outcomes.check(
            ("video",), request, lambda: list(stub.GenerateVideo(request, timeout=RPC_TIMEOUT))
        )
        if events:
            result = events[-1].result
            assert events[-1].WhichOneof("event") == "result"
            assert result.num_frames == (request.num_frames or models_info.default_num_frames)
            assert result.size_bytes == sum(len(e.chunk.data) for e in events)

    check()
    outcomes.assert_mixed()


def test_gateway_write_script_answers_ok_or_invalid_argument(stack, channels):
    stub = gw_grpc.GatewayServiceStub(channels["gateway"])
    outcomes = Outcomes(channels)

    @EXAMPLES
    @given(request=write_script_requests())
    def check(request: gw.WriteScriptRequest) -> None:
        reply = outcomes.check(
            ("gateway", "llm"), request, lambda: stub.WriteScript(request, timeout=RPC_TIMEOUT)
        )
        if reply is not None:
            assert len(reply.script.scenes) == (request.num_scenes or 3)
            assert all(scene.narration for scene in reply.script.scenes)

    check()
    outcomes.assert_mixed()


def test_gateway_create_video_answers_ok_or_invalid_argument(stack, channels):
    stub = gw_grpc.GatewayServiceStub(channels["gateway"])
    outcomes = Outcomes(channels)

    @EXAMPLES
    @given(request=create_video_requests())
    # Found by this test: seed + scene index overflowed int64 in the gateway (INTERNAL).
    @example(
        request=gw.CreateVideoRequest(
            brief="x",
            num_scenes=2,
            video=gw.VideoParameters(
                width=16, height=16, num_frames=1, num_inference_steps=1, seed=2**63 - 1
            ),
        )
    )
    def check(request: gw.CreateVideoRequest) -> None:
        events = outcomes.check(
            ("gateway", "llm", "video"),
            request,
            lambda: list(stub.CreateVideo(request, timeout=RPC_TIMEOUT)),
        )
        if events:
            assert events[0].WhichOneof("event") == "script"
            assert events[-1].WhichOneof("event") == "summary"

    check()
    outcomes.assert_mixed()


METHODS = [
    ("llm", "/scriptreel.llm.v1.LlmService/Generate", llm_pb.GenerateRequest, True),
    ("llm", "/scriptreel.llm.v1.LlmService/GetModelInfo", llm_pb.GetModelInfoRequest, False),
    ("video", "/scriptreel.video.v1.VideoService/GenerateVideo", video_pb.GenerateVideoRequest, True),
    ("video", "/scriptreel.video.v1.VideoService/GetModelInfo", video_pb.GetModelInfoRequest, False),
    ("gateway", "/scriptreel.gateway.v1.GatewayService/WriteScript", gw.WriteScriptRequest, False),
    ("gateway", "/scriptreel.gateway.v1.GatewayService/CreateVideo", gw.CreateVideoRequest, True),
    ("gateway", "/scriptreel.gateway.v1.GatewayService/GetStatus", gw.GetStatusRequest, False),
]


def _unparsable(message_type: type[Message], body: bytes) -> bool:
    try:
        message_type.FromString(body)
    except DecodeError:
        return True
    return False


def test_request_bodies_that_do_not_parse_are_invalid_argument(stack, channels):
    """What clients in other languages can send: corrupt wire format, invalid UTF-8 in strings."""
    outcomes = Outcomes(channels)
    # A GenerateRequest whose prompt holds bytes that are not UTF-8.
    bad_utf8 = b"\x0a\x04\xff\xfe\xc0\x80"

    @EXAMPLES
    @given(method=st.sampled_from(METHODS), body=st.binary(min_size=1, max_size=64))
    @example(method=METHODS[0], body=bad_utf8)
    def check(method: tuple[str, str, type[Message], bool], body: bytes) -> None:
        server, path, message_type, streaming = method
        assume(_unparsable(message_type, body))
        channel = channels[server]
        call = channel.unary_stream(path) if streaming else channel.unary_unary(path)
        with pytest.raises(grpc.RpcError) as info:
            reply = call(body, timeout=RPC_TIMEOUT)
            if streaming:
                list(reply)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, info.value.details())
        assert "not a valid message" in info.value.details()
        outcomes.codes["INVALID_ARGUMENT"] += 1
        assert health(channel) == "SERVING"

    check()
    print(f"undecodable bodies: {dict(outcomes.codes)}")
    assert outcomes.codes["INVALID_ARGUMENT"] >= 10


def test_a_request_over_16_mib_is_resource_exhausted(stack, channels):
    stub = video_grpc.VideoServiceStub(channels["video"])
    request = video_pb.GenerateVideoRequest(image=bytes(17 << 20))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateVideo(request, timeout=RPC_TIMEOUT))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert health(channels["video"]) == "SERVING"
