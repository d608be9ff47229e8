"""Describe the device a server runs on, for plan resolution and memory accounting."""

from __future__ import annotations

import os

import torch

from vram.plan import Hardware


def detect(device: str) -> Hardware:
    """Describe `device` ("cpu", "cuda", "cuda:N"); "auto" means cuda:0 if present, else cpu."""
    device = resolve_device(device)
    if device == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Hardware(device="cpu", total_bytes=total, compute_capability=None, bf16=True)
    index = torch.device(device).index or 0
    props = torch.cuda.get_device_properties(index)
    return Hardware(
        device=f"cuda:{index}",
        total_bytes=props.total_memory,
        compute_capability=(props.major, props.minor),
        bf16=props.major >= 8,
    )


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda:0" or "cpu"; "cuda" into "cuda:0"."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return "cuda:0"
    return device
