"""LLM serving speed through the gRPC server (issue 4): decode tokens/s, time to first token, peaks.

    python -m bench.llm --out bench/results/llm.json                                   # on a GPU
    python -m bench.llm --folder models/llm --device cpu --out /tmp/llm.json           # a dry run

For each precision (`--precisions`, default fp16,int8,fp8) it starts `python -m llm_server` on the
full-size random-weight GLM (bench/fullsize.py, ChatGLM3-6B dimensions; built if missing) and drives it
over gRPC, one phase after the other, each bounded in time:
- decode: one stream at a time, greedy, `--new-tokens` (256); tokens/s is the final message's
  completion_tokens over the call's wall time (a short prompt's prefill included), median run;
- concurrent: `--concurrency` (16) streams at once; tokens/s is their completion tokens together over
  the time from the first call to the last final message;
- ttft: a prompt of `--prompt-tokens` (512) at idle with max_new_tokens=1; the time to the end of the
  stream, p50 over `--ttft-runs` (10) after two warm-ups;
- itl_ms_p50: the median gap between consecutive streamed text messages (one message per token here);
- peak_bytes: the largest request peak the final messages report (memory.peak_allocated_bytes);
- replay_ms_1_row: what a one-row decoding step's CUDA graph takes alone in that process (the server
  logs it after capture), so that the time between tokens can be set against the kernels each process
  compiled: two compilations of the same code differ by up to 10% (inductor's tuning);
- compiled_graphs: how many of that process's compiled graphs came from inductor's cache and how many
  it compiled. The server and the in-process engine share one cache directory (`--inductor-cache`),
  and the server runs first, so the in-process engine loads the kernels the server compiled and tuned:
  the ratio then compares the paths on the same kernels, not two compilations.
The decode phase is repeated through LlmEngine in a child process (same folder, same settings, through
llm_server's own `engine_config`) for the gRPC overhead ratio (`--in-process`, default fp16).
An existing --out keeps its records, except those this run replaces (same precision, path, phase,
commit and `--label`): each record carries its commit and command.

The random GLM has 65,024 token ids, but its tokenizer (copied from the tiny model) knows 1,024: the
others decode to nothing, so the server would send one text message per ~60 tokens. The benchmark
therefore serves a twin folder (weights linked, not copied) whose tokenizer adds a placeholder token for
every id it lacks: each generated token then streams as one message, as with a real checkpoint's
tokenizer. Prompts tokenize exactly as before.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.common import child_job, header, report, write
from gateway.stack import ServerProcess, free_port
from llm_server.decode import CACHE_MESSAGE, REPLAY_MESSAGE
from scriptreel.llm.v1 import llm_service_pb2 as pb
from scriptreel.llm.v1 import llm_service_pb2_grpc as pb_grpc

# llm_server.decode logs what its compiled kernels cost in that process (the tuning varies by compilation).
REPLAY_LOGGED = re.compile(re.escape(REPLAY_MESSAGE.split("%")[0]) + r"([0-9.]+) ms")
CACHE_LOGGED = re.compile(
    re.escape(CACHE_MESSAGE.split("%")[0]) + r"(\d+) graphs from the inductor cache, (\d+)"
)

log = logging.getLogger("bench.llm")
# Greedy decoding of random weights may hit the end-of-sequence id; the first prompt whose short warm-up
# run does not is used for the decode phases.
DECODE_PROMPTS = (
    "Write the script of a 20-second teaser for a mountain bike.",
    "A short film about a lighthouse keeper, in three scenes:",
    "Once upon a time, in a valley between two mountains,",
    "The quick brown fox jumps over the lazy dog.",
)
FILLER = ("the mountain bike rides down a forest trail at dawn while a drone follows it over the valley",)


@dataclass(frozen=True)
class Workload:
    """What each precision is put through (see the module docstring)."""

    new_tokens: int = 256
    concurrency: int = 16
    prompt_tokens: int = 512
    ttft_runs: int = 10
    decode_runs: int = 5
    max_context: int = 1024
    call_timeout: float = 120.0
    phase_timeout: float = 150.0


@dataclass
class Stream:
    """Client-side timing of one Generate stream (perf_counter seconds)."""

    start: float
    end: float = 0.0
    arrivals: list[float] = field(default_factory=list)  # of messages carrying text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_by_length: bool = False
    peak_bytes: int = 0


# -- statistics -------------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def summarize(streams: list[Stream], concurrency: int) -> dict[str, Any]:
    """The record fields a set of streams gives (all streams of one phase)."""
    wall = max(s.end for s in streams) - min(s.start for s in streams)
    tokens = sum(s.completion_tokens for s in streams)
    gaps = [b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:], strict=False)]
    first = [s.arrivals[0] - s.start for s in streams if s.arrivals]
    messages = sum(len(s.arrivals) for s in streams)
    per_run = [s.completion_tokens / (s.end - s.start) for s in streams if s.end > s.start]
    return {
        "concurrency": concurrency,
        "prompt_tokens": streams[0].prompt_tokens,
        "new_tokens": tokens // len(streams)
        if tokens % len(streams) == 0
        else round(tokens / len(streams), 1),
        # batch 1: the median run's rate; concurrent: all tokens over the phase's wall time
        "tokens_per_s": round(_median(per_run) or 0.0, 1) if concurrency == 1 else round(tokens / wall, 1),
        "ttft_ms_p50": _ms(_median(first)),
        "itl_ms_p50": _ms(_median(gaps)),
        "peak_bytes": max(s.peak_bytes for s in streams),
        "streams": len(streams),
        "streams_to_length": sum(s.finished_by_length for s in streams),
        "text_messages_per_token": round(messages / tokens, 3) if tokens else None,
        "runs_tokens_per_s": [round(r, 1) for r in per_run] if concurrency == 1 else None,
    }


# -- prompts ----------------------------------------------------------------------------------------------
def exact_prompt(count: Callable[[str], int], target: int) -> str:
    """Text whose tokenization (as the server counts it) is `target` tokens, or the closest below."""
    vocabulary = FILLER[0].split()
    words = [vocabulary[i % len(vocabulary)] for i in range(target * 2)]
    low, high = 1, len(words)
    while low < high:  # the most words that stay within the target
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(" ".join(words[:mid])) <= target else (low, mid - 1)
    text = " ".join(words[:low])
    for suffix in ("", ".", " a", " an", ",", " the", " a.", " an."):
        if count(text + suffix) == target:
            return text + suffix
    return text


def decodable_folder(folder: Path, workdir: Path) -> tuple[Path, str]:
    """The folder to serve: `folder` itself, or its twin whose tokenizer decodes every model id."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if len(tokenizer) >= vocab:
        return folder, "the folder's own"
    twin = workdir / f"{folder.name}-decodable"
    note = f"the folder's, plus {vocab - len(tokenizer)} placeholder tokens for the ids it lacks"
    if (twin / "tokenizer.json").exists():
        return twin, note
    twin.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if not item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (twin / item.name).unlink(missing_ok=True)
            (twin / item.name).symlink_to(item.resolve())
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), vocab)])
    tokenizer.save_pretrained(twin)
    return twin, note


# -- gRPC -------------------------------------------------------------------------------------------------
def grpc_stream(stub: pb_grpc.LlmServiceStub, prompt: str, new_tokens: int, timeout: float) -> Stream:
    """One greedy Generate call, timed at the client."""
    request = pb.GenerateRequest(prompt=prompt, max_new_tokens=new_tokens, temperature=0.0)
    stream = Stream(start=time.perf_counter())
    final = None
    for message in stub.Generate(request, timeout=timeout):
        if message.text:
            stream.arrivals.append(time.perf_counter())
        if message.HasField("usage"):
            final = message
    stream.end = time.perf_counter()
    if final is None:
        raise RuntimeError("the stream ended without a final message")
    stream.prompt_tokens = final.usage.prompt_tokens
    stream.completion_tokens = final.usage.completion_tokens
    stream.finished_by_length = final.finish_reason == pb.FINISH_REASON_LENGTH
    stream.peak_bytes = final.memory.peak_allocated_bytes
    return stream


class Phase:
    """A time limit shared by the calls of one phase."""

    def __init__(self, seconds: float, call_timeout: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.call_timeout = call_timeout

    def timeout(self) -> float:
        """Deadline of the next call; raises TimeoutError once the phase's time is spent."""
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise TimeoutError("the phase's time limit was reached")
        return min(self.call_timeout, left)


def pick_prompt(run: Callable[[str, int], Stream], new_tokens: int) -> str:
    """The first decode prompt whose short greedy run does not stop at an end-of-sequence id."""
    probe = min(32, new_tokens)
    for prompt in DECODE_PROMPTS:
        if run(prompt, probe).finished_by_length:
            return prompt
    return DECODE_PROMPTS[0]


def decode_phase(run: Callable[[str, int], Stream], prompt: str, work: Workload) -> dict[str, Any]:
    """Batch-1 decode: `decode_runs` streams one after the other."""
    return summarize([run(prompt, work.new_tokens) for _ in range(work.decode_runs)], 1)


def concurrent_phase(
    stub: pb_grpc.LlmServiceStub, prompt: str, work: Workload, phase: Phase
) -> dict[str, Any]:
    """`concurrency` streams started together (after a short round at the same concurrency)."""
    barrier = threading.Barrier(work.concurrency)

    def one(new_tokens: int) -> Stream:
        timeout = phase.timeout()
        barrier.wait(timeout)
        return grpc_stream(stub, prompt, new_tokens, timeout)

    with ThreadPoolExecutor(work.concurrency) as pool:
        list(pool.map(one, [8] * work.concurrency))  # warm-up: batched shapes
        barrier.reset()
        streams = list(pool.map(one, [work.new_tokens] * work.concurrency))
    return summarize(streams, work.concurrency)


def ttft_phase(stub: pb_grpc.LlmServiceStub, prompt: str, work: Workload, phase: Phase) -> dict[str, Any]:
    """Time to the end of a max_new_tokens=1 stream for a long prompt, at idle."""
    for _ in range(2):
        grpc_stream(stub, prompt, 1, phase.timeout())
    streams = []
    for _ in range(work.ttft_runs):
        try:
            streams.append(grpc_stream(stub, prompt, 1, phase.timeout()))
        except TimeoutError:
            break
    return {
        "concurrency": 1,
        "prompt_tokens": streams[0].prompt_tokens,
        "new_tokens": 1,
        "tokens_per_s": None,
        "ttft_ms_p50": _ms(_median(s.end - s.start for s in streams)),
        "itl_ms_p50": None,
        "peak_bytes": max(s.peak_bytes for s in streams),
        "runs": len(streams),
    }


def server_settings(folder: Path, device: str, precision: str, work: Workload) -> dict[str, str]:
    """LlmSettings fields of the benchmark (the server's environment and the in-process engine's)."""
    return {
        "model_dir": str(folder),
        "device": device,
        "precision": precision,
        "allow_fallback": "false",  # measure the precision asked for, or fail
        "max_batch_size": str(work.concurrency),
        "max_context_tokens": str(work.max_context),
        "max_new_tokens_limit": str(max(work.new_tokens, 1)),
        "max_queue": str(max(64, 2 * work.concurrency)),
    }


def grpc_records(
    settings: dict[str, str], work: Workload, logs: Path, load_timeout: float, environment: dict[str, str]
) -> tuple[list[dict[str, Any]], str | None]:
    """Serve one precision and run the phases; returns the records and the decode prompt used."""
    from transformers import AutoTokenizer

    precision = settings["precision"]
    port = free_port()
    env = {f"SCRIPTREEL_LLM_{k.upper()}": v for k, v in settings.items()}
    env |= {"SCRIPTREEL_LLM_HOST": "127.0.0.1", "SCRIPTREEL_LLM_PORT": str(port)}
    env |= {"SCRIPTREEL_LLM_METRICS_PORT": "-1", "SCRIPTREEL_LLM_GRACE_SECONDS": "5", **environment}
    server = ServerProcess("llm", "llm_server", port, -1, env, logs / f"llm-{precision}.log")
    base: dict[str, Any] = {"precision": precision, "path": "grpc"}
    records: list[dict[str, Any]] = []
    prompt = None
    server.start()
    try:
        start = time.perf_counter()
        server.wait_serving(load_timeout)
        base["startup_seconds"] = round(time.perf_counter() - start, 1)
        with server.channel() as channel:
            stub = pb_grpc.LlmServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).info
            base |= {
                "plan": info.plan.reason,
                "compute_dtype": info.plan.compute_dtype,
                "weights_bytes": info.memory.weights_bytes,
                "predicted_peak_bytes": info.plan.predicted_peak_bytes,
                "parameters": info.parameter_count,
            }
            run = _grpc_runner(stub, Phase(work.phase_timeout, work.call_timeout))
            prompt = pick_prompt(run, work.new_tokens)
            tokenizer = AutoTokenizer.from_pretrained(settings["model_dir"])
            long_prompt = exact_prompt(lambda t: len(tokenizer(t)["input_ids"]), work.prompt_tokens)
            phases: list[tuple[str, Callable[[Phase], dict[str, Any]]]] = [
                ("decode", lambda p: decode_phase(_grpc_runner(stub, p), prompt, work)),
                ("concurrent", lambda p: concurrent_phase(stub, prompt, work, p)),
                ("ttft", lambda p: ttft_phase(stub, long_prompt, work, p)),
            ]
            for name, measure in phases:
                records.append({**base, "phase": name, **_guarded(measure, work, server)})
                log.info("%s", records[-1])
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).info
            replay, compiled = logged_replay_ms(server.log_path), logged_cache_counts(server.log_path)
            for record in records:
                record["model_info_peak_bytes"] = info.memory.peak_allocated_bytes
                record["replay_ms_1_row"] = replay
                record["compiled_graphs"] = compiled
    except Exception as exc:
        records.append({**base, "error": _error(exc, server)})
    finally:
        server.stop(30)
    return records, prompt


def logged_replay_ms(log_file: Path) -> float | None:
    """The one-row step's replay time the server logged after capturing its graphs (None: not logged)."""
    found = _last_logged(REPLAY_LOGGED, log_file)
    return float(found) if found else None


def logged_cache_counts(log_file: Path) -> dict[str, int] | None:
    """The server's compiled graphs: loaded from inductor's cache and compiled (None: not logged)."""
    found = _last_logged(CACHE_LOGGED, log_file)
    return compiled_graphs((int(found[0]), int(found[1]))) if found else None


def compiled_graphs(counts: tuple[int, int] | None) -> dict[str, int] | None:
    """A record's `compiled_graphs` from DecodeStep.cache_counts (None: nothing was captured)."""
    return {"from_cache": counts[0], "compiled": counts[1]} if counts else None


def _last_logged(pattern: re.Pattern[str], log_file: Path) -> Any:
    """The groups of the pattern's last match in a log (the log is appended to), or None."""
    found = pattern.findall(log_file.read_text(errors="replace")) if log_file.exists() else []
    return found[-1] if found else None


def _grpc_runner(stub: pb_grpc.LlmServiceStub, phase: Phase) -> Callable[[str, int], Stream]:
    return lambda prompt, new_tokens: grpc_stream(stub, prompt, new_tokens, phase.timeout())


def _guarded(
    measure: Callable[[Phase], dict[str, Any]], work: Workload, server: ServerProcess
) -> dict[str, Any]:
    try:
        return measure(Phase(work.phase_timeout, work.call_timeout))
    except Exception as exc:
        return {"error": _error(exc, server)}


def _error(exc: BaseException, server: ServerProcess | None = None) -> str:
    log.error("%s", traceback.format_exc())
    details = exc.details() if isinstance(exc, grpc.RpcError) else None  # type: ignore[attr-defined]
    text = f"{type(exc).__name__}: {details or exc}"
    if server is not None and server.process is not None and server.process.poll() is not None:
        text += f"\nserver log:\n{server.tail(15)}"
    return text[:3000]


# -- in process -------------------------------------------------------------------------------------------
def in_process(settings: dict[str, str], prompt: str, work: Workload) -> dict[str, Any]:
    """The decode phase through LlmEngine in this process (run in a child process of the benchmark)."""
    from llm_server.__main__ import engine_config
    from llm_server.engine import Finished, GenerationRequest, LlmEngine
    from llm_server.settings import LlmSettings
    from serving.model_main import configure_allocator

    configure_allocator()  # as the server does, before CUDA starts
    start = time.perf_counter()
    engine = LlmEngine.load(engine_config(LlmSettings.model_validate(settings)))
    loaded = round(time.perf_counter() - start, 1)
    deadline = time.monotonic() + work.phase_timeout

    def run(text: str, new_tokens: int) -> Stream:
        prepared = engine.validate(GenerationRequest(prompt=text, max_new_tokens=new_tokens))
        stream = Stream(start=time.perf_counter())
        for event in engine.generate(prepared, lambda: time.monotonic() > deadline):
            if isinstance(event, Finished):
                stream.end = time.perf_counter()
                stream.prompt_tokens, stream.completion_tokens = event.prompt_tokens, event.completion_tokens
                stream.finished_by_length = event.finish_reason == "length"
                stream.peak_bytes = event.memory.peak_allocated_bytes
            elif event.text:
                stream.arrivals.append(time.perf_counter())
        return stream

    run(prompt, min(32, work.new_tokens))  # warm-up, as pick_prompt is over gRPC
    record = {"phase": "decode", **decode_phase(run, prompt, work), "startup_seconds": loaded}
    record["plan"] = engine.plan.reason
    step = engine._scheduler._decode
    record["replay_ms_1_row"] = step.replay_ms  # this process's compiled kernels
    record["compiled_graphs"] = compiled_graphs(step.cache_counts)
    engine.close()
    return record


def in_process_records(
    settings: dict[str, str], prompt: str, work: Workload, timeout: float, environment: dict[str, str]
) -> dict[str, Any]:
    """Run `in_process` in a child process (bounded in time; its device memory goes with it)."""
    base = {"precision": settings["precision"], "path": "in-process"}
    job = {"settings": settings, "prompt": prompt, "work": asdict(work)}
    return {**base, **child_job("bench.llm", "--in-process-job", job, {**os.environ, **environment}, timeout)}


def _in_process_job(job: str) -> None:
    spec = json.loads(job)
    try:
        result = in_process(spec["settings"], spec["prompt"], Workload(**spec["work"]))
    except Exception as exc:
        result = {"error": _error(exc)}
    report(result)


# -- main -------------------------------------------------------------------------------------------------
def main() -> None:
    """Run every precision and write the JSON (after each precision, so a cut-off run keeps its part)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/llm.json"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scriptreel-bench"))
    parser.add_argument("--logs", type=Path, help="server logs (default: logs/ beside --out)")
    parser.add_argument(
        "--inductor-cache",
        type=Path,
        help="TORCHINDUCTOR_CACHE_DIR of the server and the in-process engine (default: WORKDIR/...)",
    )
    parser.add_argument(
        "--folder", type=Path, help="model folder (default: the full-size GLM, built if missing)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default="fp16,int8,fp8")
    parser.add_argument("--in-process", default="fp16", help="precisions also run in-process ('' for none)")
    parser.add_argument("--new-tokens", type=int, default=Workload.new_tokens)
    parser.add_argument("--concurrency", type=int, default=Workload.concurrency)
    parser.add_argument("--prompt-tokens", type=int, default=Workload.prompt_tokens)
    parser.add_argument("--ttft-runs", type=int, default=Workload.ttft_runs)
    parser.add_argument("--decode-runs", type=int, default=Workload.decode_runs)
    parser.add_argument("--phase-timeout", type=float, default=Workload.phase_timeout)
    parser.add_argument("--load-timeout", type=float, default=300.0, help="seconds until a server is SERVING")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="no precision starts after this")
    parser.add_argument(
        "--label", help="tags this run's records (an A/B variant); part of what replaces a record"
    )
    parser.add_argument("--in-process-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.in_process_job:
        _in_process_job(args.in_process_job)
        return
    began = time.monotonic()
    work = Workload(
        new_tokens=args.new_tokens,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        ttft_runs=args.ttft_runs,
        decode_runs=args.decode_runs,
        max_context=max(1024, args.prompt_tokens + 64, 64 + args.new_tokens),
        phase_timeout=args.phase_timeout,
    )
    folder = args.folder or full_size_glm(args.workdir, args.device)
    served, tokenizer_note = decodable_folder(folder, args.workdir)
    result: dict[str, Any] = {**header(), "folder": str(folder), "tokenizer": tokenizer_note}
    result |= {"workload": asdict(work), "records": []}
    earlier = json.loads(args.out.read_text()).get("records", []) if args.out.exists() else []
    logs = args.logs or args.out.parent / "logs"
    cache = args.inductor_cache or args.workdir / "inductor-cache"
    environment = {"TORCHINDUCTOR_CACHE_DIR": str(cache.resolve())}
    for precision in [p for p in args.precisions.split(",") if p]:
        if time.monotonic() - began > args.max_seconds:
            result["records"].append({"precision": precision, "error": "skipped: --max-seconds spent"})
            continue
        settings = server_settings(served, args.device, precision, work)
        records, prompt = grpc_records(settings, work, logs, args.load_timeout, environment)
        if prompt is not None and precision in args.in_process.split(","):
            local = in_process_records(
                settings, prompt, work, args.load_timeout + work.phase_timeout, environment
            )
            decode = next((r for r in records if r.get("phase") == "decode" and "error" not in r), None)
            if decode and local.get("tokens_per_s"):
                decode["grpc_over_in_process"] = round(decode["tokens_per_s"] / local["tokens_per_s"], 3)
            records.append(local)
            log.info("%s", local)
        for record in records:
            if args.label:
                record["label"] = args.label
            record.setdefault("prompt", prompt)
            record.setdefault("commit", result["commit"])
            record.setdefault("command", result["command"])
        result["records"] = merged(result["records"], records)
        write(args.out, {**result, "records": merged(earlier, result["records"])})
    result["seconds"] = round(time.monotonic() - began, 1)
    write(args.out, {**result, "records": merged(earlier, result["records"])})


def merged(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier records (of --out) that the new ones do not replace, then the new ones.

    A record is replaced by one of the same precision, path, phase, commit and label, so runs of several
    precisions, commits or variants into one file keep each other's records.
    """

    def key(record: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(record.get(k) for k in ("precision", "path", "phase", "commit", "label"))

    replaced = {key(r) for r in new}
    return [r for r in earlier if key(r) not in replaced] + new


def full_size_glm(workdir: Path, device: str) -> Path:
    """WORKDIR/glm, the random-weight GLM of ChatGLM3-6B's dimensions (bench.fullsize), built if missing."""
    folder = workdir / "glm"
    if not (folder / "config.json").exists():
        import torch

        from bench.fullsize import build_glm

        start = time.perf_counter()
        build_glm(folder, tokenizer_dir=Path("models/llm"), device=device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("built %s in %.0fs", folder, time.perf_counter() - start)
    return folder


if __name__ == "__main__":
    main()
