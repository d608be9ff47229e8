"""Tiny, randomly initialised but structurally real diffusers video pipelines.

`build_svd` writes a StableVideoDiffusionPipeline (image-to-video: a spatio-temporal UNet, the temporal
VAE decoder, a CLIP vision encoder, SVD-XT's image processor and scheduler settings) and
`build_text_to_video` writes a CogVideoXPipeline (text-to-video: a 3D transformer, the causal 3D VAE, a
T5 encoder and a character-level T5 tokenizer that loads offline). Both are saved with `save_pretrained`
(safetensors), so the video server loads them through exactly the code that loads real checkpoints. They
render noise, honestly: the weights are random.

Each folder also holds `scriptreel.json`, the request defaults and limits that suit such a tiny model on
a CPU; real model folders have no such file and the engine uses the family's defaults instead.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLTemporalDecoder,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

SIDECAR = "scriptreel.json"
NOTE = "tiny random-weight pipeline built by tiny_models: it renders noise"

# Request defaults and limits of the tiny pipelines (written to scriptreel.json).
SVD_DEFAULTS = {
    "family": "svd",
    "default_width": 64,
    "default_height": 64,
    "default_num_frames": 8,
    "default_num_inference_steps": 4,
    "default_fps": 7,
    "max_width": 256,
    "max_height": 256,
    "max_num_frames": 25,
}
T2V_DEFAULTS = {
    "family": "cogvideox",
    "default_width": 64,
    "default_height": 64,
    "default_num_frames": 9,
    "default_num_inference_steps": 4,
    "default_fps": 8,
    "max_width": 256,
    "max_height": 256,
    "max_num_frames": 25,
}

# SVD-XT's scheduler and image-processor settings (stabilityai/stable-video-diffusion-img2vid-xt).
SVD_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "sigma_max": 700.0,
    "sigma_min": 0.002,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "use_karras_sigmas": True,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# CogVideoX-2b's scheduler settings (THUDM/CogVideoX-2b).
COGVIDEOX_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}
TEXT_TOKENS = 64  # the tiny transformer's max_text_seq_length (CogVideoX-2b: 226)


def build_svd(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny Stable Video Diffusion (image-to-video) pipeline to `out_dir`.

    Args:
        out_dir: Folder to write (created; existing files are overwritten).
        seed: Seed of the random weights (same seed, same bytes).

    Returns:
        `out_dir`.
    """
    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,  # 3 added time ids x addition_time_embed_dim
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=8,
    )
    vae = AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
            projection_dim=32,
        )
    )
    feature_extractor = CLIPImageProcessor(
        crop_size={"height": 224, "width": 224},
        size={"shortest_edge": 224},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=feature_extractor,
    )
    return _save(pipe, out_dir, SVD_DEFAULTS)


def build_text_to_video(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny CogVideoX (text-to-video) pipeline to `out_dir`.

    Args:
        out_dir: Folder to write (created; existing files are overwritten).
        seed: Seed of the random weights (same seed, same bytes).

    Returns:
        `out_dir`.
    """
    torch.manual_seed(seed)
    tokenizer = _char_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        # Tiled decoding uses tiles of half these sizes; diffusers' tiling only reassembles frames of the
        # right size when a tile's latent height is a multiple of 6 and its width a multiple of 5 (as
        # CogVideoX's own 480x720 gives), so 96x80 rather than 64x64.
        sample_height=96,
        sample_width=80,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,  # latent size of the 64x64 default
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=TEXT_TOKENS,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER),
    )
    return _save(pipe, out_dir, T2V_DEFAULTS)


def _char_tokenizer() -> T5Tokenizer:
    """Build a real T5 tokenizer (Unigram + Metaspace, pad 0, eos 1, unk 2) over single ASCII characters."""
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_TOKENS)


def _save(pipe: object, out_dir: Path, defaults: dict[str, object]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[attr-defined]
    sidecar = {"note": NOTE, **defaults}
    (out_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out_dir
