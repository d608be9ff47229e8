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

This module runs the product as one Triton kernel, the reduction inductor generates with the sizes
compiled in, and its launch configuration looked up instead of tuned: the fastest measured for the
shape inside a CUDA graph of a whole step's products of that shape (MEASURED, `python -m
bench.gemv_sweep --apply`), else a rule that follows those measurements. Every start then runs the same
kernels. Elsewhere (CPU, no Triton, other dtypes, more than one row) it is F.linear.

`one_row_linear` is a torch custom op, so compiled pieces (llm_server.fusion) call it as one opaque
kernel and fuse what surrounds it.

Measured (H200, 2026-11-29, commit 0fd88fb): the products of one step took 2.845 and 2.849 ms in two
processes (4.20 TB/s; inductor's tuned reduction 3.011 and 3.479 in the same two processes, 2.95-3.70
over session 8's; cuBLAS 3.32), and the engine's one-row step replayed in 3.571 ms against 3.919 with
inductor's products in the same process (bench.weight_placement, bench.decode_profile). With INT8/FP8
weights (torchao's, read as stored and scaled per row) at their swept configurations, the FP8 step
replayed in 2.639 ms against 3.821 (commit 9454c89). So llm_server.fusion routes every plan's
one-row products here.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without Triton: F.linear then
    triton = None

# (out features, in features, stored weight dtype) -> (rows per program, columns per iteration,
# warps), on an H200, for the GLM of ChatGLM3-6B's dimensions: the fastest of this kernel's candidates
# in a CUDA graph of the step's products of that shape (28 layers', 56 for the quantized plans' q and
# output, or the LM head's one), median of 5 rounds of 30 replays (`python -m bench.gemv_sweep
# --apply`, 2026-11-29; bench/results/gemv_sweep.json, gemv_sweep_quantized.json). INT8 and FP8 are
# apart: at the same bytes their conversions cost differently, and their best configurations differ.
# BF16 weights take FP16's entries (same bytes, same conversion). Other shapes take the rule in
# `launch_config`. Both come from the H200, and every GPU uses them: on another GPU model, run the
# sweep there and keep its table here.
MEASURED: dict[tuple[int, int, str], tuple[int, int, int]] = {
    (4608, 4096, "float16"): (1, 2048, 8),  # 0.284 ms for 28
    (4096, 4096, "float16"): (1, 1024, 8),  # 0.2579 ms for 28
    (27392, 4096, "float16"): (1, 1024, 8),  # 1.4172 ms for 28
    (4096, 13696, "float16"): (4, 2048, 4),  # 0.7739 ms for 28
    (65024, 4096, "float16"): (2, 2048, 4),  # 0.1191 ms for 1
    (4096, 4096, "int8"): (2, 4096, 8),  # 0.4042 ms for 56
    (256, 4096, "int8"): (1, 2048, 8),  # 0.1239 ms for 56
    (27392, 4096, "int8"): (4, 2048, 8),  # 0.8988 ms for 28
    (4096, 13696, "int8"): (1, 2048, 8),  # 0.5254 ms for 28
    (4096, 4096, "float8_e4m3fn"): (2, 4096, 4),  # 0.3571 ms for 56
    (256, 4096, "float8_e4m3fn"): (1, 1024, 8),  # 0.1201 ms for 56
    (27392, 4096, "float8_e4m3fn"): (4, 4096, 8),  # 0.7841 ms for 28
    (4096, 13696, "float8_e4m3fn"): (8, 1024, 4),  # 0.4938 ms for 28
}
DTYPES = (torch.float16, torch.bfloat16)
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn)
ACCUMULATORS = 64  # FP32 accumulators a thread holds at most (rows x columns / threads): more spill


def dtype_name(dtype: torch.dtype) -> str:
    """How MEASURED names a weight dtype ("float16", "int8", "float8_e4m3fn")."""
    return str(dtype).removeprefix("torch.")


def launch_config(
    out_features: int, in_features: int, dtype: torch.dtype = torch.float16
) -> tuple[int, int, int]:
    """(rows per program, columns per iteration, warps) for a stored weight of this shape and dtype.

    Shapes not in MEASURED take a rule drawn from the sweeps' timings of every candidate
    (bench/results/gemv_sweep.json, gemv_sweep_quantized.json).
    """
    names = [dtype_name(dtype), *(["float16"] if dtype == torch.bfloat16 else [])]
    for name in names:
        if (out_features, in_features, name) in MEASURED:
            return MEASURED[(out_features, in_features, name)]
    # Rows of up to 8,192 columns: for 16-bit weights a row per program of 8 warps (within 1% of the
    # best for every such shape); for 1-byte ones, read in one or two iterations, 2 rows of 4 warps
    # sharing each load of the input (within 5.3% of the best for the four INT8/FP8 shapes of 4,096
    # rows and more, where a row per program was 16-56% slower), given enough rows to fill the GPU.
    # Longer rows: 4 rows of 4 warps. Iterations of up to 4,096 bytes, within ACCUMULATORS.
    if in_features > 8192:
        rows, warps = 4, 4
    elif dtype.itemsize == 1 and out_features >= 2048:
        rows, warps = 2, 4
    else:
        rows, warps = 1, 8
    widest = min(4096 // dtype.itemsize, ACCUMULATORS * 32 * warps // rows)
    columns = min(widest, 1 << max(0, in_features - 1).bit_length())
    return rows, columns, max(1, min(warps, rows * columns // 256))  # small rows: fewer threads


def fits(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None
) -> bool:
    """Whether the kernel runs this product (else F.linear does).

    Without `scale`, the weight has x's dtype (FP16 or BF16); with it, the weight is INT8 or FP8
    (FP8 needs compute capability 8.9) and `scale` holds one factor per output row.
    """
    if triton is None or not x.is_cuda or x.dtype not in DTYPES:
        return False
    if scale is None:
        stored = weight.dtype == x.dtype
    else:
        stored = (
            weight.dtype in QUANTIZED_DTYPES
            and scale.numel() == weight.shape[0]
            and scale.is_contiguous()
            and (weight.dtype != torch.float8_e4m3fn or _capability(x.device) >= (8, 9))
        )
    return (
        stored
        and x.numel() == x.shape[-1] == weight.shape[1]
        and x.is_contiguous()
        and weight.is_contiguous()
        and weight.numel() < 2**31  # the kernel's offsets are 32-bit
        and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous()))
    )


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unpack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the stored INT8/FP8 values, one scale per row) of a torchao weight-only tensor, else None.

    torchao's Int8WeightOnlyConfig and Float8WeightOnlyConfig (version 2) store a Linear's weight as
    an Int8Tensor or Float8Tensor: `qdata` (out x in) and `scale` (out x 1), the weight being their
    product. Weight-only means no activation quantization nor pre-scale; like torchao's own
    weight-only product, this ignores the symmetric INT8 tensor's zero point (zeros).
    """
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if (
        qdata is None
        or scale is None
        or getattr(weight, "act_quant_kwargs", None) is not None
        or getattr(weight, "act_pre_scale", None) is not None
        or qdata.dim() != 2
        or qdata.dtype not in QUANTIZED_DTYPES
        or scale.numel() != qdata.shape[0]
    ):
        return None
    return qdata, scale


if triton is not None:

    @triton.jit
    def _one_row(
        x,
        w,
        b,
        s,
        out,
        N: tl.constexpr,
        K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SCALED: tl.constexpr,
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
        if SCALED:  # INT8/FP8 weights: the row's scale, once per row
            result *= tl.load(s + rows, mask=live, other=0.0).to(tl.float32)
        if HAS_BIAS:
            result += tl.load(b + rows, mask=live, other=0.0).to(tl.float32)
        tl.store(out + rows, result.to(out.dtype.element_ty), mask=live)


def run(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: tuple[int, int, int],
    scale: torch.Tensor | None = None,
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
        out if scale is None else scale,  # nor without a scale
        out,
        N=n,
        K=k,
        HAS_BIAS=bias is not None,
        SCALED=scale is not None,
        ROWS=rows,
        COLUMNS=columns,
        num_warps=warps,
        num_stages=1,
    )
    return out


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ weight.T + bias for one row of x, as llm_server.fusion's one-row steps compute it.

    FP16/BF16 weights go to `one_row_linear`, torchao's per-row INT8/FP8 weight-only tensors to
    `one_row_scaled_linear`; any other weight (int4, another layout) to F.linear, which torchao's
    tensor subclasses implement.
    """
    parts = unpack(weight)
    if parts is not None:
        return one_row_scaled_linear(x, *parts, bias)
    if type(weight) in (torch.Tensor, torch.nn.Parameter):
        return one_row_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.custom_op("scriptreel::one_row_linear", mutates_args=())
def one_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ weight.T + bias for one row of x: the kernel where it `fits`, else F.linear."""
    if not fits(x, weight, bias):
        return F.linear(x, weight, bias)
    return run(x, weight, bias, launch_config(weight.shape[0], weight.shape[1], weight.dtype))


@torch.library.custom_op("scriptreel::one_row_scaled_linear", mutates_args=())
def one_row_scaled_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Return (x @ weight.T) * scale + bias for one row of x, weight INT8 or FP8, a scale per row.

    The kernel where it `fits`, else the same in FP32 by F.linear.
    """
    if fits(x, weight, bias, scale):
        return run(x, weight, bias, launch_config(weight.shape[0], weight.shape[1], weight.dtype), scale)
    out = F.linear(x.float(), weight.float()) * scale.reshape(-1).float()
    return (out if bias is None else out + bias.float()).to(x.dtype)


@one_row_scaled_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@one_row_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
