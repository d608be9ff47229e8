"""What the LLM engine takes and gives, transport-neutral, and the checks of a request's fields.

Field names follow scriptreel.llm.v1.GenerateRequest, so a violation's field is what the client wrote.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from llm_server.sampling import SamplingParams
from serving.errors import FieldViolation
from vram.monitor import MemorySnapshot

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 64
MAX_SCHEMA_BYTES = 16 * 1024
DEFAULT_MAX_NEW_TOKENS = 256
FINISH_REASONS = ("stop", "length", "stop_sequence")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation request, as GenerateRequest carries it (zero values mean "default").

    Attributes:
        prompt: Raw prompt text, used as is. Exactly one of prompt and messages is set.
        messages: Chat messages as (role, content); role is system, user or assistant.
        max_new_tokens: Tokens to generate at most; 0 means 256 (or what the context leaves).
        temperature: 0 to 2; 0 means greedy decoding.
        top_p: Nucleus mass in [0, 1]; 0 means 1 (off).
        top_k: Keep the k most likely tokens; 0 means off.
        seed: Seed of the request's sampling; 0 picks one.
        stop: Strings that end the generation (excluded from the text): at most 8, 64 characters each.
        json_schema: JSON schema the output should follow. Checked (a JSON object, at most 16 KiB) and
            passed on in PreparedRequest, but not yet enforced while decoding: callers must still
            parse the output robustly.

    """

    prompt: str = ""
    messages: Sequence[tuple[str, str]] = ()
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop: Sequence[str] = ()
    json_schema: str = ""


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, tokenized and with every default resolved.

    Attributes:
        input_ids: The prompt's token ids (after the chat template).
        max_new_tokens: Tokens to generate at most.
        sampling: Temperature, top-p, top-k and the resolved seed.
        stop: Stop sequences.
        json_schema: The schema text, or "".
        predicted_bytes: Device memory this request may add (KV cache + prefill), for admission.

    """

    input_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    json_schema: str = ""
    predicted_bytes: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.input_ids)


@dataclass(frozen=True)
class TextDelta:
    """New text of a generation since the previous delta (never splits a character)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation.

    Attributes:
        finish_reason: "stop" (end-of-sequence token), "length" (max_new_tokens reached) or
            "stop_sequence" (a stop string was produced; the text ends before it).
        prompt_tokens: Tokens of the prompt.
        completion_tokens: Tokens generated (an end-of-sequence token counts; text after a stop
            sequence's last token does not exist, so nothing is counted past it).
        memory: Memory figures with this request's peak.

    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    memory: MemorySnapshot


def field_violations(request: GenerationRequest, max_new_tokens_limit: int) -> list[FieldViolation]:
    """Every violation that can be found without the tokenizer."""
    bad: list[FieldViolation] = []
    if request.prompt and request.messages:
        bad.append(FieldViolation("messages", "set either prompt or messages, not both"))
    elif not request.prompt and not request.messages:
        bad.append(FieldViolation("prompt", "set prompt (raw text) or messages (chat); both are empty"))
    for i, (role, _content) in enumerate(request.messages):
        if role not in ROLES:
            bad.append(FieldViolation(f"messages[{i}].role", f"{role!r} is not one of {', '.join(ROLES)}"))
    if not 0.0 <= request.temperature <= 2.0:
        bad.append(FieldViolation("temperature", f"{request.temperature} is outside [0, 2]"))
    if not 0.0 <= request.top_p <= 1.0:
        bad.append(FieldViolation("top_p", f"{request.top_p} is outside [0, 1]"))
    if request.top_k < 0:
        bad.append(FieldViolation("top_k", f"{request.top_k} is negative"))
    if not 0 <= request.max_new_tokens <= max_new_tokens_limit:
        bad.append(
            FieldViolation(
                "max_new_tokens", f"{request.max_new_tokens} is outside [0, {max_new_tokens_limit}]"
            )
        )
    if len(request.stop) > MAX_STOP_SEQUENCES:
        bad.append(
            FieldViolation("stop", f"{len(request.stop)} stop sequences; at most {MAX_STOP_SEQUENCES}")
        )
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            bad.append(FieldViolation(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters long"))
    bad.extend(_schema_violations(request.json_schema))
    return bad


def _schema_violations(schema: str) -> list[FieldViolation]:
    if not schema:
        return []
    if len(schema.encode()) > MAX_SCHEMA_BYTES:
        return [FieldViolation("json_schema", f"larger than {MAX_SCHEMA_BYTES} bytes")]
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as exc:
        return [FieldViolation("json_schema", f"not valid JSON: {exc}")]
    if not isinstance(parsed, dict):
        return [FieldViolation("json_schema", "must be a JSON object")]
    return []


def plain_chat(messages: Sequence[tuple[str, str]]) -> str:
    """Render a chat as plain text, for tokenizers without a chat template."""
    lines = [f"{role}: {content}" for role, content in messages]
    return "\n".join([*lines, "assistant:"])
