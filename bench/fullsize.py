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


def _materialize(module: nn.Module, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    # Non-persistent buffers (rotary frequencies) are not saved: loading recomputes them.
    module = module.to_empty(device=device).to(dtype)
    init_random(module, seed)
    return module


def glm_config(path: Path = CONFIGS / "glm-6b-chatglm3-dims.json"):  # type: ignore[no-untyped-def]
    """The GlmConfig of ChatGLM3-6B's dimensions."""
    from transformers import GlmConfig

    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
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
    pipe.save_pretrained(out, safe_serialization=True)
    del pipe
    return out
