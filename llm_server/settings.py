"""Settings of the LLM server (environment prefix SCRIPTREEL_LLM_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from serving.settings import ModelServerSettings


class LlmSettings(ModelServerSettings):
    """The LLM server's settings (see ModelServerSettings for the model and precision ones).

    Attributes:
        max_new_tokens_limit: Largest max_new_tokens a request may ask for.
        max_batch_size: Sequences decoded together (continuous batching).
        max_context_tokens: Prompt + completion limit; 0 takes the model's own context length. With
            max_batch_size it sizes the KV cache allocated at start (slots x tokens).
        prefill_chunk: Prompt tokens prefilled per step while other requests decode (long prompts are
            split, so running streams never wait for a whole prefill).
        cuda_graphs: Replay each decoding step from a CUDA graph (GPU only); false decodes eagerly.
        fuse_kernels: With cuda_graphs, compile pieces of the decoding step with torch.compile at
            start: norms, MLPs, rotary embedding and the decode attention; FP16/BF16 plans also fuse
            q/k/v into one product and compile the other Linears for one-row steps; INT8 and FP8
            plans compile every Linear, so 8-bit weights are read inside the products instead of
            dequantized first; every plan's one-row products run llm_server.gemv's kernel
            (llm_server.fusion.for_plan; about 30-60 s more start-up for a 6B model).
        overlap_steps: Launch each decoding step before handling the previous step's tokens (text,
            stops, events), so the GPU never waits for the host between steps; false handles each
            step before launching the next (same tokens, for comparison).
    """

    model_config = SettingsConfigDict(env_prefix="SCRIPTREEL_LLM_", cli_prog_name="python -m llm_server")

    port: int = 50052
    metrics_port: int = 9102
    max_queue: int = 64
    model_dir: Path = Path("models/llm")
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    max_batch_size: int = Field(default=8, ge=1)
    max_context_tokens: int = Field(default=0, ge=0)
    prefill_chunk: int = Field(default=512, ge=16)
    cuda_graphs: bool = True
    fuse_kernels: bool = True
    overlap_steps: bool = True
