"""Writing a script: the prompt sent to the LLM, and robust parsing with a deterministic fallback.

The LLM is asked for JSON following `SCRIPT_SCHEMA`. Whatever it returns, `parse_script` yields a
well-formed script of exactly the requested number of scenes, or None; `fallback_script` then writes
one from the brief alone, so the video step never fails because the LLM rambled.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field

from serving.errors import FieldViolation, collect

MAX_BRIEF_CHARS = 2000
MAX_SCENES = 12
DEFAULT_SCENES = 3
MAX_LABEL_CHARS = 64


@dataclass(frozen=True)
class ScriptRequest:
    """A validated WriteScript request."""

    brief: str
    num_scenes: int = DEFAULT_SCENES
    style: str = ""
    language: str = "en"


@dataclass(frozen=True)
class SceneText:
    """One scene of a script."""

    index: int
    narration: str
    visual_prompt: str
    duration_seconds: float


@dataclass(frozen=True)
class ScriptText:
    """A whole script."""

    title: str
    scenes: list[SceneText] = field(default_factory=list)


SCRIPT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "scenes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "narration": {"type": "string"},
                    "visual_prompt": {"type": "string"},
                    "duration_seconds": {"type": "number"},
                },
                "required": ["narration", "visual_prompt"],
            },
        },
    },
    "required": ["title", "scenes"],
}


def validate_request(brief: str, num_scenes: int, style: str, language: str) -> ScriptRequest:
    """Check a WriteScript/CreateVideo request's script fields; InvalidArgument lists every problem."""
    violations = []
    if not brief.strip():
        violations.append(FieldViolation("brief", "must not be empty"))
    elif len(brief) > MAX_BRIEF_CHARS:
        violations.append(FieldViolation("brief", f"is {len(brief)} characters; at most {MAX_BRIEF_CHARS}"))
    if not 0 <= num_scenes <= MAX_SCENES:
        violations.append(
            FieldViolation("num_scenes", f"must be 1 to {MAX_SCENES} (0 means {DEFAULT_SCENES})")
        )
    for name, value in (("style", style), ("language", language)):
        if len(value) > MAX_LABEL_CHARS:
            violations.append(FieldViolation(name, f"at most {MAX_LABEL_CHARS} characters"))
    collect(violations)
    return ScriptRequest(brief.strip(), num_scenes or DEFAULT_SCENES, style.strip(), language.strip() or "en")


def prompt_messages(request: ScriptRequest) -> list[tuple[str, str]]:
    """The chat messages that ask the LLM for a script."""
    style = f" in a {request.style} style" if request.style else ""
    system = (
        "You write short video scripts. Answer with one JSON object only: "
        '{"title": str, "scenes": [{"narration": str, "visual_prompt": str, "duration_seconds": number}]}.'
    )
    user = (
        f"Write a script of exactly {request.num_scenes} scenes{style}, language {request.language}, "
        f"for this brief: {request.brief}"
    )
    return [("system", system), ("user", user)]


def parse_script(text: str, request: ScriptRequest) -> ScriptText | None:
    """The script in the LLM's output, or None when it holds no usable one.

    Accepts the first JSON object in the text (code fences and chatter around it are ignored). Scenes
    beyond the requested number are dropped; too few scenes, or scenes without text, mean None.
    """
    data = _first_json_object(text)
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        return None
    scenes: list[SceneText] = []
    for raw in data["scenes"][: request.num_scenes]:
        if not isinstance(raw, dict):
            return None
        narration = _clean(raw.get("narration"))
        visual = _clean(raw.get("visual_prompt")) or narration
        if not narration:
            return None
        duration = raw.get("duration_seconds")
        seconds = float(duration) if isinstance(duration, int | float) and 0 < duration <= 60 else 4.0
        scenes.append(SceneText(len(scenes), narration, visual, seconds))
    if len(scenes) != request.num_scenes:
        return None
    title = _clean(data.get("title")) or _title_from(request.brief)
    return ScriptText(title, scenes)


def fallback_script(request: ScriptRequest) -> ScriptText:
    """A deterministic script built from the brief alone."""
    beats = ["Opening", "Close-up", "In action", "Detail", "Wide shot", "Finale"]
    style = f", {request.style} style" if request.style else ""
    scenes = []
    for i in range(request.num_scenes):
        beat = beats[i % len(beats)] if i < request.num_scenes - 1 or i == 0 else "Finale"
        narration = f"{beat}: {request.brief}"
        visual = f"{beat.lower()} of {request.brief}{style}, cinematic lighting"
        scenes.append(SceneText(i, narration, visual, 4.0))
    return ScriptText(_title_from(request.brief), scenes)


def _title_from(brief: str) -> str:
    return textwrap.shorten(brief, width=60, placeholder="...").rstrip(".").capitalize()


def _clean(value: object) -> str:
    return re.sub(r"\s+", " ", value).strip()[:500] if isinstance(value, str) else ""


def _first_json_object(text: str) -> object:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        return value
    return None
