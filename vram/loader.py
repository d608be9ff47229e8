"""Load a model under a plan, falling back along FP16 -> BF16 -> FP32 when loading or warm-up fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from vram.plan import Footprint, Hardware, Policy, PrecisionPlan, fallback_chain

log = logging.getLogger(__name__)
M = TypeVar("M")


class WarmupFailed(RuntimeError):
    """The warm-up probe of a loaded model produced non-finite values."""


def load_with_fallback(
    load: Callable[[PrecisionPlan], M],
    probe: Callable[[M], None],
    plan: PrecisionPlan,
    policy: Policy,
    hw: Hardware,
    footprint: Footprint,
    on_fallback: Callable[[PrecisionPlan, str], None] = lambda plan, why: None,
    release: Callable[[M], None] = lambda model: None,
) -> tuple[M, PrecisionPlan]:
    """Load with `plan`; on a failed load or probe, try the next allowed precision.

    Args:
        load: Builds the model under a plan (raises on failure).
        probe: Runs a warm-up request; raises WarmupFailed on non-finite output.
        plan: The resolved plan to try first.
        policy: The settings (whether fallback is allowed).
        hw: The device.
        footprint: For the fallback plans' predictions.
        on_fallback: Called with the abandoned plan and the reason (metrics, logs).
        release: Frees a model that failed its probe before the next attempt.

    Returns:
        The loaded model and the plan it runs with (its `fallbacks` list what was abandoned).

    Raises:
        RuntimeError: Every allowed precision failed; the message lists why.
    """
    chain = fallback_chain(plan, policy, hw)
    while True:
        model = None
        try:
            model = load(plan)
            probe(model)
            log.info("loaded with plan %s (%s)", plan.precision, plan.reason)
            return model, plan
        except Exception as exc:  # any failure moves along the chain
            why = f"{type(exc).__name__}: {exc}"
            if model is not None:
                release(model)
            if not chain:
                raise RuntimeError(
                    f"could not load in {plan.precision} ({why}); no fallback left "
                    f"(tried: {', '.join(plan.fallbacks) or 'none'})"
                ) from exc
            nxt = chain.pop(0)
            log.warning("precision %s failed (%s); falling back to %s", plan.precision, why, nxt)
            on_fallback(plan, why)
            plan = plan.with_fallback(nxt, why, footprint, hw)
            # Under a budget, a precision predicted not to fit would only fail again, after a load.
            while policy.budget_bytes is not None and plan.predicted_peak_bytes > policy.budget_bytes:
                over = f"predicted {plan.predicted_peak_bytes / 2**30:.1f} GiB, over the budget"
                log.warning("skipping %s: %s", plan.precision, over)
                if not chain:
                    tried = "; ".join((*plan.fallbacks, f"{plan.precision}: {over}"))
                    raise RuntimeError(f"no precision loads within the budget (tried: {tried})") from exc
                plan = plan.with_fallback(chain.pop(0), over, footprint, hw)
