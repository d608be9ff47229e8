"""Which quantized precisions the installed libraries can run, found once at start."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def torchao_precisions() -> frozenset[str]:
    """Precisions torchao can store here: int8 and fp8 with torchao; int4 also needs its `mslk` kernels.

    torchao 0.18's int4 weight-only layout imports the `mslk` package at quantization time; without it
    int4 is refused at start with a clear message instead of failing in the middle of a load.
    """
    if importlib.util.find_spec("torchao") is None:
        return frozenset()
    found = {"int8", "fp8"}
    if importlib.util.find_spec("mslk") is not None:
        found.add("int4")
    return frozenset(found)
