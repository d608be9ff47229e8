"""A tiny, randomly initialised GLM decoder with a real byte-level BPE tokenizer.

Structurally a real checkpoint (transformers' GlmForCausalLM, the family of ChatGLM3-6B, scaled
down; a `tokenizers` BPE tokenizer with a ChatML-like chat template), saved with `save_pretrained` so
that the servers load it through the same code that loads real models. It writes noise, honestly: the
weights are random.

`build_overflow_llm` writes the same model with two weight matrices scaled so that its activations
overflow FP16 (max 65504) but stay finite in BF16 and FP32: a real overflow for the tests of the
precision fallback.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 1024
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(len(SPECIAL_TOKENS))
# Scale of layer 0's MLP weights in the overflow model: its output reaches ~1e8, far past FP16's
# 65504 (BF16 and FP32 reach 3e38), while every weight (|w| < 200) stays representable in FP16.
OVERFLOW_SCALE = 2000.0

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer: plain English about the things scriptreel writes about.
CORPUS = """\
A short video starts with a brief. The brief says what the viewer should feel in twenty seconds: the
rush of a mountain bike on a narrow trail, the quiet of a lake at dawn, the warmth of a kitchen on a
winter evening. The writer turns the brief into a script, and the script into scenes. Each scene has a
narration, a visual prompt and a duration in seconds.

The first scene sets the place. A camera moves slowly over a ridge while the sun rises behind the
mountains. Light spills across the valley, the grass is wet, and a rider checks the chain of her bike.
The narration is short: "Every trail begins before sunrise." The second scene brings movement. The rider
drops into the forest, wheels kick up dust, branches flash past the lens, and the sound of the tyres
fills the frame. The third scene is the summit: wide, calm and bright, with the rider standing next to
the bike and looking out over the clouds.

Good scripts are simple. They use concrete nouns and active verbs. They describe what the camera sees,
not what the writer thinks. A visual prompt names the subject, the setting, the light, the lens and the
motion: "a red mountain bike on a rocky trail, golden hour, wide angle, slow tracking shot". A narration
line should be easy to read aloud in the time the scene lasts. Three or four scenes are enough for a
teaser; a longer story needs more time and more care.

The model that writes the script is a language model. It reads the prompt as a sequence of tokens and
predicts the next token, one at a time, until it reaches the end of the text or the limit on new tokens.
Sampling with a temperature makes the text more varied; a temperature of zero always picks the most
likely token. Top-k keeps only the k most likely tokens, and top-p keeps the smallest set of tokens whose
probabilities add up to p. A fixed seed makes the same request give the same answer again.

The video model turns each visual prompt into a short clip. It starts from noise and removes a little of
it at every step, guided by the prompt or by a conditioning image, until frames appear. The frames are
decoded, encoded as H.264 and joined into one file that ordinary players open. Memory is the hard part:
weights, activations and caches must fit on the card, so the servers choose a precision, keep a few
sensitive layers in full precision, and measure what they use instead of guessing.

Questions people ask about the service are practical. How long does a video take? Which card do I need?
What happens when the queue is full, when a client goes away, or when the numbers overflow? The answers
are in the logs, the metrics and the documentation: the server refuses work it cannot finish, stops work
nobody waits for, and falls back to a safer precision when half precision is not enough.

Here are some more sentences to give the tokenizer a wider vocabulary. The weather was cold and clear.
She walked to the station, bought a ticket and waited for the train. The children laughed at the dog
that chased its own tail in the garden. He wrote a letter to his brother, who lived by the sea and
worked on a fishing boat. The market opened at nine; people bought bread, cheese, apples, fish and
flowers. In the evening the city lights came on one by one, and the river reflected them like stars.
Numbers and dates matter too: 1, 2, 3, 10, 20, 30, 100, 2024, 12:30, 3.5 seconds, 16 GB, 24 frames.
"""


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on CORPUS (deterministic: same text, same merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A",
        pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", BOS_ID)],
    )
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, token
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
    )


def tiny_config(vocab_size: int) -> GlmConfig:
    """ChatGLM3-6B's architecture (see shared/configs/glm-6b-chatglm3-dims.json), scaled down."""
    return GlmConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        max_position_embeddings=MAX_POSITIONS,
        attention_bias=True,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, IM_END_ID],
        architectures=["GlmForCausalLM"],
    )


def build_llm(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny LM and its tokenizer into `out_dir` (safetensors, loadable offline).

    Args:
        out_dir: Destination folder (created if missing).
        seed: Seed of the random weights.

    Returns:
        `out_dir`.

    """
    return _build(Path(out_dir), seed, overflow=False)


def build_overflow_llm(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny LM with layer 0's MLP scaled so that FP16 activations overflow to inf.

    BF16 and FP32 (8 exponent bits) hold the same activations finitely; so do the weights in FP16.

    Args:
        out_dir: Destination folder (created if missing).
        seed: Seed of the random weights.

    Returns:
        `out_dir`.

    """
    return _build(Path(out_dir), seed, overflow=True)


def _build(out_dir: Path, seed: int, overflow: bool) -> Path:
    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    model = GlmForCausalLM(tiny_config(len(tokenizer)))
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID
    )
    if overflow:
        mlp = model.model.layers[0].mlp
        with torch.no_grad():
            mlp.gate_up_proj.weight.mul_(OVERFLOW_SCALE)
            mlp.down_proj.weight.mul_(OVERFLOW_SCALE)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
