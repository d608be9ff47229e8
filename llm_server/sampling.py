"""Choosing the next token from one sequence's logits: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (already validated).

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: Nucleus mass in (0, 1]; 1 keeps every token.
        top_k: Keep the k most likely tokens; 0 keeps every token.
        seed: Seed of the request's own generator (never 0: `resolve_seed` picks one).

    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 1

    @property
    def greedy(self) -> bool:
        """True when the most likely token is always taken."""
        return self.temperature == 0.0


def resolve_seed(seed: int) -> int:
    """Return the request's seed, or a fresh random one for 0 ("pick one")."""
    return seed if seed != 0 else secrets.randbits(62) + 1


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """Seed a generator for this request alone, so other requests in the batch never shift its draws."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next token from one sequence's logits, on their device (no synchronisation).

    Args:
        logits: Shape (vocab,), finite, any float dtype; processed in float32.
        params: The request's sampling settings.
        generator: The request's generator (None when greedy).

    Returns:
        The token id, a 0-dim tensor.

    """
    if params.greedy or generator is None:
        return torch.argmax(logits)
    # Shift so the largest score is 0 before dividing: a tiny temperature then gives 0 and -inf (the
    # argmax is kept), never inf - inf = NaN, which would fail the draw.
    scores = logits.float()
    scores = (scores - scores.max()) / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely one always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def sample_batch(
    logits: torch.Tensor, rows: Sequence[tuple[SamplingParams, torch.Generator | None]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token, and whether its logits were finite, on their device (no synchronisation).

    Greedy rows share one batched argmax; each sampling row draws with its own generator. A row whose
    logits are not finite draws from zeros instead: a NaN would fail the draw (on a GPU, with a
    device-side assert that ends the process's CUDA context), and the caller discards that row's
    token anyway, as `finite` says.

    Args:
        logits: Shape (rows, vocab).
        rows: Each row's sampling settings and generator.

    Returns:
        (tokens, finite): shape (rows,) each, long and bool.

    """
    finite = torch.isfinite(logits).all(dim=-1)
    tokens = torch.argmax(logits, dim=-1)
    for i, (params, generator) in enumerate(rows):
        if not params.greedy:
            tokens[i] = next_token(torch.where(finite[i], logits[i], 0.0), params, generator)
    return tokens, finite
