"""One-row matrix products (a decoding step at batch 1) with launch configurations fixed per shape.

At batch 1 a decoding step is a handful of matrix-vector products that read every weight once, and
how fast they read decides the decode rate. Inductor compiles each such product into a reduction and
chooses its launch configuration (rows per program, columns per iteration, warps) by timing
candidates when the process starts (coordinate-descent tuning). Those timings are noisy: on an H200
the same configuration of the down projection timed 34.5 us in one process and 46.5 us in the next
(bench.replay_spread's kernel report), so each start settled on different configurations, and the
products of one step took 2.95 to 3.70 ms from one process to the next, each process steady wherever
its weights lay (bench.weight_placement, 2026-11-29). The autotune cache did not settle it: a process
that found its configurations there tuned them again.

This module runs the product as one Triton kernel, the reduction inductor generates, with the launch
configuration looked up instead of tuned: the fastest seen for the shape inside a CUDA graph of a
whole step (MEASURED), else a rule that follows those measurements. Every start then runs the same
kernels. Elsewhere (CPU, no Triton, other dtypes, more than one row) it is F.linear.

`one_row_linear` is a torch custom op, so compiled pieces (llm_server.fusion) call it as one opaque
kernel and fuse what surrounds it.

Measured (H200, 2026-11-29; bench.weight_placement and bench.replay_spread): steady, but not yet
fast enough to be the default (llm_server.fusion.HALF leaves `gemv` off). The products of one step
took 3.218 and 3.222 ms at two placements (cuBLAS 3.32; inductor's tuned reduction 2.95-3.70 from
process to process), and the engine's one-row step replayed in 3.877 and 3.886 ms in two processes
(inductor's: 3.59-4.01). With the same launch configuration, inductor's kernel read the gate-and-up
weights in 1.397 ms a step and this one in 1.572. The likely difference: inductor compiles the sizes
in (`static`), so its loops have fixed bounds and its loads no masks where the sizes divide the
blocks, while that kernel (e151947) took the sizes as arguments. This one compiles them in
(constexpr), one kernel per shape; it has not been timed yet (bench.decode_profile's "half+gemv"
variant runs the engine with it, bench.weight_placement's "gemv" kernel the products alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: F.linear then
    triton = None

# (out features, in features) -> (rows per program, columns per iteration, warps), FP16 on an H200:
# the configurations inductor's tuning found that ran fastest in a CUDA graph of 28 layers' products
# (bench.weight_placement, 2026-11-29), for the GLM of ChatGLM3-6B's dimensions. Those timings are
# inductor's kernel's; `python -m bench.gemv_sweep` times this kernel's own candidates the same way
# and prints the table to put here (not run yet).
MEASURED: dict[tuple[int, int], tuple[int, int, int]] = {
    (4608, 4096): (2, 4096, 16),  # q/k/v, concatenated: 0.295 ms for 28 layers
    (4096, 4096): (2, 2048, 16),  # attention output: 0.296 ms
    (27392, 4096): (1, 2048, 8),  # gate and up: 1.397 ms
    (4096, 13696): (4, 2048, 16),  # down: 0.836 ms
    (65024, 4096): (2, 4096, 16),  # LM head: 0.117 ms
}
DTYPES = (torch.float16, torch.bfloat16)


def launch_config(out_features: int, in_features: int) -> tuple[int, int, int]:
    """(rows per program, columns per iteration, warps) for a weight of this shape."""
    if (out_features, in_features) in MEASURED:
        return MEASURED[(out_features, in_features)]
    columns = min(2048, 1 << max(0, in_features - 1).bit_length())
    rows = 4 if in_features > 8192 else 2
    return rows, columns, max(1, min(16, rows * columns // 256))


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the kernel runs this product (else F.linear does)."""
    return (
        triton is not None
        and x.is_cuda
        and x.numel() == x.shape[-1] == weight.shape[1]
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.numel() < 2**31  # the kernel's offsets are 32-bit
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
    )


if triton is not None:

    @triton.jit
    def _one_row(
        x,
        w,
        b,
        out,
        N: tl.constexpr,
        K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ROWS: tl.constexpr,
        COLUMNS: tl.constexpr,
    ):
        # The sizes are compiled in, as inductor does for a static shape: fixed loop bounds, and no
        # masks where they divide the blocks (every shape of the reference model but the down
        # projection's 13,696 columns).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        live = rows < N
        total = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
        for start in range(0, K, COLUMNS):
            columns = start + tl.arange(0, COLUMNS)
            where = w + rows[:, None] * K + columns[None, :]
            if N % ROWS == 0 and K % COLUMNS == 0:
                vector = tl.load(x + columns, eviction_policy="evict_last")
                block = tl.load(where, eviction_policy="evict_first")
            else:
                inside = columns < K
                vector = tl.load(x + columns, mask=inside, other=0.0, eviction_policy="evict_last")
                mask = live[:, None] & inside[None, :]
                block = tl.load(where, mask=mask, other=0.0, eviction_policy="evict_first")
            total += block.to(tl.float32) * vector.to(tl.float32)[None, :]
        result = tl.sum(total, axis=1)
        if HAS_BIAS:
            result += tl.load(b + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(out + rows, result.to(out.dtype.element_ty), mask=live)


def run(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple[int, int, int]
) -> torch.Tensor:
    """The kernel at this launch configuration (rows per program, columns per iteration, warps).

    For products that `fits`; `one_row_linear` takes the configuration from `launch_config`,
    bench.gemv_sweep tries others.
    """
    n, k = weight.shape
    rows, columns, warps = config
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _one_row[(triton.cdiv(n, rows),)](
        x,
        weight,
        out if bias is None else bias,  # any pointer: not read without a bias
        out,
        N=n,
        K=k,
        HAS_BIAS=bias is not None,
        ROWS=rows,
        COLUMNS=columns,
        num_warps=warps,
        num_stages=1,
    )
    return out


@torch.library.custom_op("scriptreel::one_row_linear", mutates_args=())
def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ weight.T + bias for one row of x: the kernel where it `fits`, else F.linear."""
    if not fits(x, weight, bias):
        return F.linear(x, weight, bias)
    return run(x, weight, bias, launch_config(*weight.shape))


@one_row_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
