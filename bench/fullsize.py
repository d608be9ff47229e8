"""Full-size model folders with random weights, built from the public configs in bench/configs.

Memory and speed depend on the architecture, not on the weights' values, so random weights measure
them exactly. The folders are written with save_pretrained and loaded by the servers' own loading
code, like real checkpoints. Weights are drawn on the GPU (normal(0, 0.02) for matrices, ones for
norm weights, zeros for biases) from a fixed seed, so every precision loads the same values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIGS = Path(__file__).resolve().parent / "configs"


@torch.no_grad()
def init_random(module: nn.Module, seed: int = 0) -> None:
    """Fill every parameter in place: normal(0, 0.02) for matrices, ones for norms, zeros for biases."""
    gen = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            tmp = torch.empty(param.shape, device=param.device, dtype=torch.float32)
            tmp.normal_(0.0, 0.02, generator=gen)
            param.copy_(tmp)
            del tmp
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def _materialize(module: Any, device: str, dtype: torch.dtype, seed: int) -> Any:
    # Cast on the meta device first, so the device holds the weights once, in their saved dtype.
    # Non-persistent buffers (rotary frequencies, CogVideoX's sin-cos position table) are left
    # uninitialised by to_empty; they are not saved, and loading recomputes them.
    module = module.to(dtype).to_empty(device=device)
    if callable(tie := getattr(module, "tie_weights", None)):
        tie()  # to_empty gives each module its own copy of a shared parameter (T5's embedding table)
    init_random(module, seed)
    return module


def config_values(path: Path, **overrides: Any) -> dict[str, Any]:
    """A JSON config's values, less the keys starting with "_" (_source, _class_name, ...), plus overrides."""
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return values | overrides


def glm_config(path: Path = CONFIGS / "glm-6b-chatglm3-dims.json"):  # type: ignore[no-untyped-def]
    """The GlmConfig of ChatGLM3-6B's dimensions."""
    from transformers import GlmConfig

    values = config_values(path)
    values.pop("model_type", None)
    return GlmConfig(**values)


def build_glm(
    out: Path,
    tokenizer_dir: Path,
    device: str = "cuda",
    dtype: torch.dtype = torch.float16,
    config_path: Path = CONFIGS / "glm-6b-chatglm3-dims.json",
) -> Path:
    """Write a random-weight GLM folder (tokenizer copied from `tokenizer_dir`)."""
    from transformers import AutoModelForCausalLM

    config = glm_config(config_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = _materialize(model, device, dtype, seed=0)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    del model
    for item in tokenizer_dir.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(item, out / item.name)
    return out


def build_svd_xt(
    out: Path, device: str = "cuda", dtype: torch.dtype = torch.float16, configs: Path = CONFIGS / "svd-xt"
) -> Path:
    """Write a random-weight Stable Video Diffusion XT pipeline folder."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(
            UNetSpatioTemporalConditionModel.load_config(configs / "unet")
        )
        vae = AutoencoderKLTemporalDecoder.from_config(
            AutoencoderKLTemporalDecoder.load_config(configs / "vae")
        )
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(configs / "image_encoder"))
    pipe = StableVideoDiffusionPipeline(
        vae=_materialize(vae, device, dtype, 1),
        image_encoder=_materialize(encoder, device, dtype, 2),
        unet=_materialize(unet, device, dtype, 3),
        scheduler=EulerDiscreteScheduler.from_pretrained(configs / "scheduler"),
        feature_extractor=CLIPImageProcessor.from_pretrained(configs / "feature_extractor"),
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    del pipe
    return out


def cogvideox_2b_modules(
    configs: Path = CONFIGS / "cogvideox-2b", overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """CogVideoX-2b's transformer, VAE and text encoder on the meta device (nothing is allocated).

    Args:
        configs: The component configs (one folder a component, as a pipeline folder has them).
        overrides: Values replacing the configs' per component ("transformer", "text_encoder",
            "vae"), for a scaled-down twin in tests; none gives the full size.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    more = overrides or {}

    def values(component: str) -> dict[str, Any]:
        return config_values(configs / component / "config.json", **more.get(component, {}))

    with torch.device("meta"):
        return {
            "transformer": CogVideoXTransformer3DModel.from_config(values("transformer")),
            "vae": AutoencoderKLCogVideoX.from_config(values("vae")),
            "text_encoder": T5EncoderModel(T5Config(**values("text_encoder"))),
        }


def build_cogvideox_2b(
    out: Path,
    tokenizer_dir: Path,
    device: str = "cuda",
    dtype: torch.dtype = torch.float16,
    configs: Path = CONFIGS / "cogvideox-2b",
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write a random-weight CogVideoX-2b (text-to-video) pipeline folder.

    The transformer (1.694e9 parameters), the T5 v1.1 XXL encoder (4.762e9) and the causal 3D VAE
    (2.16e8) come from the public configs in `configs` (cogvideox_2b_modules), the scheduler from
    CogVideoX-2b's scheduler config; weights are saved in FP16, as the public checkpoint ships them.
    Each module is drawn on `device` in its saved dtype (init_random draws each parameter in FP32 and
    casts it), so the largest, the encoder, needs 9.5 GB there. CogVideoX-2b has no rotary embedding;
    its sin-cos position table is a non-persistent buffer that loading recomputes, so nothing needs
    rebuilding.

    The tokenizer is the tiny text-to-video model's character-level T5 tokenizer from
    `tokenizer_dir` (models/t2v/tokenizer): its ids are all below 32128, so they index the full
    encoder's embedding table; its model_max_length is set to the transformer's 226 text tokens.

    Args:
        out: Folder to write.
        tokenizer_dir: The tokenizer folder to copy.
        device: Where the weights are drawn.
        dtype: Saved dtype.
        configs: The component configs.
        overrides: Per-component config overrides (cogvideox_2b_modules); none builds the full size.

    Returns:
        `out`.
    """
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
    from transformers import T5Tokenizer

    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {tokenizer_dir} (`make models` builds models/t2v/tokenizer)"
        )
    modules = cogvideox_2b_modules(configs, overrides)
    modules["text_encoder"].config.dtype = dtype
    tokenizer = T5Tokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = modules["transformer"].config.max_text_seq_length
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_materialize(modules["text_encoder"], device, dtype, 2),
        vae=_materialize(modules["vae"], device, dtype, 1),
        transformer=_materialize(modules["transformer"], device, dtype, 3),
        scheduler=CogVideoXDDIMScheduler.from_config(
            config_values(configs / "scheduler" / "scheduler_config.json")
        ),
    )
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    del pipe, modules
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # 13 GB the servers started next may want
    return out
