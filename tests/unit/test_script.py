"""The gateway's script parsing: always a well-formed script."""

import json

import pytest

from gateway.script import ScriptRequest, fallback_script, parse_script, validate_request
from serving.errors import InvalidArgument

REQUEST = ScriptRequest("a teaser for a mountain bike", num_scenes=2)
GOOD = {
    "title": "Ride",
    "scenes": [
        {"narration": "Dawn on the trail.", "visual_prompt": "misty forest trail", "duration_seconds": 5},
        {"narration": "Full speed.", "visual_prompt": "bike jumping", "duration_seconds": 3.5},
    ],
}


def test_parses_json_inside_chatter_and_fences():
    text = "Sure! Here it is:\n```json\n" + json.dumps(GOOD) + "\n```\nEnjoy."
    script = parse_script(text, REQUEST)
    assert script is not None and script.title == "Ride"
    assert [(s.index, s.visual_prompt, s.duration_seconds) for s in script.scenes] == [
        (0, "misty forest trail", 5.0),
        (1, "bike jumping", 3.5),
    ]


def test_extra_scenes_are_dropped_and_missing_fields_filled():
    data = {"scenes": [*GOOD["scenes"], {"narration": "extra"}]}
    data["scenes"][1] = {"narration": "No prompt", "duration_seconds": 999}
    script = parse_script(json.dumps(data), REQUEST)
    assert script is not None and len(script.scenes) == 2
    assert script.scenes[1].visual_prompt == "No prompt" and script.scenes[1].duration_seconds == 4.0
    assert script.title == "A teaser for a mountain bike"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "noise Ġx ĠĠ{{",
        '{"title": 1}',
        json.dumps({"scenes": [{"narration": "only one"}]}),
        json.dumps({"scenes": ["a", "b"]}),
        '{"scenes": [{"narration": ""}, {"narration": "x"}]}',
    ],
)
def test_unusable_output_gives_none(text):
    assert parse_script(text, REQUEST) is None


def test_fallback_is_deterministic_and_complete():
    first, second = fallback_script(REQUEST), fallback_script(REQUEST)
    assert first == second and len(first.scenes) == 2
    assert all(s.narration and s.visual_prompt for s in first.scenes)


def test_validation_lists_every_bad_field():
    with pytest.raises(InvalidArgument) as info:
        validate_request("", 40, "s" * 100, "")
    assert {v.field for v in info.value.violations} == {"brief", "num_scenes", "style"}
    assert validate_request("  x ", 0, "", "").num_scenes == 3
