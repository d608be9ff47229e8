"""Fuse the small kernels of a decoding step with torch.compile, module by module (CUDA graphs only).

A decoding step of a 6B model at batch 1 reads 12 GB of weights in a few large matrix-vector
products, but also runs about fifty small kernels per layer (norms, rotary embeddings, activation,
residuals), each costing a few microseconds even inside a CUDA graph: at 28 layers they take as long
as the weights. Compiling the pieces that hold no state fuses them: each RMSNorm into one kernel, the
MLP's activation into its product, the rotary embedding into one kernel per tensor. Pieces are
compiled once and shared by every layer (the same code, the weights as inputs). The cache update
stays eager: it is the slots' (llm_server.slots), captured as it is. What else is compiled is a
`Fusion`'s choice:

- `linears`: the Linears outside the MLPs (attention projections, LM head), for every row count
  ("all": quantized weights are then read as stored inside the product, not dequantized first) or
  for one-row steps only ("one-row": a matrix-vector product as a tuned reduction; with more rows
  cuBLAS is faster);
- `qkv`: one product for the query, key and value projections instead of three (their weights are
  concatenated once, and the three Linears keep views of it, so no memory is added);
- `attention`: the decode attention (llm_server.attention.decode), with this kernel;
- `tune`: inductor's coordinate-descent tuning, which one-row products need to reach the memory
  bandwidth;
- `static`: compile each piece for the sizes it first meets, and only the sizes that change later as
  dynamic (torch.compile's automatic dynamic shapes): the one-row step, the first captured, gets
  kernels specialised to its sizes (those of the weights passed as tensors included), the others share
  a kernel dynamic in the rows. Without it every size but a parameter's is symbolic from the start.
  The decode attention stays dynamic either way: its columns change with every bucket, and a kernel
  tuned for the first (64 columns) then serves all of them;
- `split_mlp`: at one-row steps, the MLP as two compiled pieces, its gated activation's product
  (materialised) and then its down projection as a one-row product, where one piece would recompute
  the activation inside the down projection's reduction for every block of outputs;
- `gemv`: one-row products (the q/k/v, output, gate-and-up and down projections, the LM head) by
  llm_server.gemv's kernel, whose launch configurations are fixed per shape, instead of inductor's
  reduction tuned anew at every start (which made the same step 10-20% slower in some processes).
  FP16/BF16 weights and torchao's per-row INT8/FP8 weight-only tensors (read as stored, scaled per
  row); other weights keep their own product. On in every plan: the kernel is steady from start to
  start and faster than inductor's tuned reduction at its best (see llm_server.gemv), for 8-bit
  weights by far.

The compiled versions run only inside `compiled()`, which llm_server.decode enters while it captures
its graphs: the fused kernels end up in the decode graphs, and everything else (prefill, eager
fallbacks) keeps the eager modules, which run a long prompt faster than the compiled wrappers with
dynamic shapes (measured on the H200: 57.7 ms to the first token of a 512-token prompt with compiled
prefill, 28.3 ms eager).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llm_server import attention, gemv

NORM_SUFFIX = "RMSNorm"
MLP_SUFFIX = "MLP"
ROPE_FUNCTION = "apply_rotary_pos_emb"
PROJECTIONS = ("q_proj", "k_proj", "v_proj")
_EAGER = "_eager_"  # prefix of the attribute keeping a patched module-level function's eager version

_state = threading.local()


@dataclass(frozen=True)
class Fusion:
    """What `fuse` compiles besides norms, MLPs and the rotary embedding (see the module docstring)."""

    linears: Literal["none", "one-row", "all"] = "none"
    qkv: bool = False
    attention: Literal["sdpa", "matmul"] | None = None
    tune: bool = False
    static: bool = False
    split_mlp: bool = False
    gemv: bool = False


# What the engine compiles per plan (bench.decode_profile on an H200, GLM 6.24e9):
# - every plan: the decode attention as the matmul kernel (a 1 x 1024 step: 4.04 ms, against 5.13
#   with eager SDPA);
# - FP16/BF16: one q/k/v product, and the other Linears for one-row steps only (at 16 rows cuBLAS is
#   faster: Linears compiled at every row count lost 9% at 16 streams). In-process decode went from
#   193.7 to 243.6 tokens/s at batch 1 and from 1,969 to 2,885 with 16 streams; compiled `static`,
#   a one-row step's replay went from 3.88 to 3.73 ms (the q/k/v product: 0.50 to 0.31 ms a step);
#   with `split_mlp`, the down projections took 0.91 ms a step instead of 0.98-1.31 (one run each:
#   inductor's coordinate-descent tuning varies by about 10% from one compilation to the next);
#   with `gemv` (2026-11-29, its launch configurations swept in-graph), the step's products took
#   2.845 and 2.849 ms in two processes where inductor's took 3.011 and 3.479, and a one-row step
#   replayed in 3.571 ms against 3.919 in the same process (in-process batch 1: 258.4 against 240.4
#   tokens/s);
# - quantized weights: every Linear at every row count, tuned, read as stored inside the product
#   (INT8 batch-1 decode went from 136 to 262 tokens/s); at one-row steps `gemv` with `split_mlp`
#   instead, INT8/FP8 read as stored and scaled per row by llm_server.gemv at launch configurations
#   swept for them: in one process, the FP8 one-row step replayed in 2.639 ms against 3.821 with
#   inductor's products, and in-process batch 1 rose from 232.2 to 336.8 tokens/s (INT8: 214.2 to
#   304.0, on FP8's configurations; bench.decode_profile, 2026-11-29).
QUANTIZED = Fusion(linears="all", tune=True, attention="matmul", split_mlp=True, gemv=True)
NOTHING_MORE = Fusion()
HALF = Fusion(
    linears="one-row", qkv=True, tune=True, attention="matmul", static=True, split_mlp=True, gemv=True
)


def for_plan(model: nn.Module, quantized: bool, headroom_bytes: int) -> Fusion:
    """What to compile for a plan: QUANTIZED or HALF, HALF without `qkv` when memory is short.

    Concatenating a layer's projections allocates them anew before the originals are freed, and the
    freed blocks need not fit the next layer's concatenation: in the worst case the transient is all
    q/k/v weights again. On a 24 GB card with the LLM's share (12.75 GiB), the first concatenation
    already ran out of memory (12.00 GiB allowed, 11.66 allocated; H200, bench.compat), so `qkv` is
    kept only when the plan's predicted peak leaves room for all of them.

    Args:
        model: The loaded causal LM.
        quantized: Whether the plan stores weights quantized.
        headroom_bytes: The plan's budget (or the device) minus its predicted peak.
    """
    if quantized:
        return QUANTIZED
    if headroom_bytes < projection_bytes(model):
        return dataclasses.replace(HALF, qkv=False)
    return HALF


def projection_bytes(model: nn.Module) -> int:
    """Bytes of the query, key and value projections' weights and biases."""
    return sum(
        t.numel() * t.element_size()
        for module in model.modules()
        for name in PROJECTIONS
        if isinstance(getattr(module, name, None), nn.Linear)
        for t in getattr(module, name).parameters()
    )


@contextlib.contextmanager
def compiled() -> Iterator[None]:
    """Run the fused (compiled) versions in this thread while inside."""
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def inductor_cache_counts() -> tuple[int, int]:
    """(graphs loaded from inductor's FX graph cache, graphs compiled) in this process so far.

    A graph loaded from the cache brings its kernels and their tuned launch configurations with it:
    processes sharing a cache directory (TORCHINDUCTOR_CACHE_DIR) run the same kernels.
    """
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def inductor_cache_dir() -> str:
    """Inductor's cache directory (TORCHINDUCTOR_CACHE_DIR, else a folder in the system's temp dir)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older torch
        from torch._inductor.runtime.runtime_utils import cache_dir  # type: ignore[no-redef]
    return str(cache_dir())


def _on() -> bool:
    return getattr(_state, "on", False)


def _one_row(x: torch.Tensor) -> bool:
    return x.numel() == x.shape[-1]


def _compile(
    function: Callable[..., Any], backend: str | Callable[..., Any], static: bool
) -> Callable[..., Any]:
    """torch.compile, dynamic in every size from the start or (static) only in those that change."""
    return torch.compile(function, dynamic=None if static else True, backend=backend)


def _either(
    eager: Callable[..., Any],
    compiler: Callable[[Callable[..., Any]], Callable[..., Any]],
    when: Callable[[torch.Tensor], bool] | None = None,
    fused: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """A callable running `eager`, or its compiled version (its `fused` attribute) inside compiled().

    With `when`, the compiled version runs only where `when(first argument)` holds. With `fused`, that
    function is compiled instead of `eager` (the same computation, written for the compiler).
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        fused = _on() and (when is None or when(args[0]))
        return (forward.fused if fused else eager)(*args, **kwargs)  # type: ignore[attr-defined]

    forward.fused = compiler(fused or eager)  # type: ignore[attr-defined]
    return forward


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ weight.T + bias as mm and add: inductor decomposes a one-row mm, not addmm."""
    out = F.linear(x, weight)
    return out if bias is None else out + bias


class FusedQKV:
    """The query, key and value projections of one attention layer as one product.

    The weights (and biases) are concatenated once; the three Linears then hold views of the
    concatenation, so their eager forwards (prefill) are unchanged and no memory is added. Inside
    `compiled()`, the query projection's call computes all three and keeps the key's and value's
    parts for the next two calls on the same input; a call on another input computes its own.
    """

    def __init__(self, projections: list[nn.Linear], one_row: Callable[..., torch.Tensor]) -> None:
        self.sizes = [p.out_features for p in projections]
        with torch.no_grad():
            self.weight = torch.cat([p.weight for p in projections])
            biases = [p.bias for p in projections]
            self.bias = None if biases[0] is None else torch.cat(biases)  # type: ignore[arg-type]
            start = 0
            for p, size in zip(projections, self.sizes, strict=True):
                p.weight = nn.Parameter(self.weight[start : start + size], requires_grad=False)
                if self.bias is not None:
                    p.bias = nn.Parameter(self.bias[start : start + size], requires_grad=False)
                start += size
        self.one_row = one_row  # the compiled product for one-row steps, shared by every layer
        self._pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        for i, p in enumerate(projections):
            p.forward = self._part(i, p.forward)  # type: ignore[method-assign]

    def _part(self, index: int, eager: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not _on():
                return eager(x)
            if index == 0 or self._pending is None or self._pending[0] is not x:
                product = (self.one_row if _one_row(x) else F.linear)(x, self.weight, self.bias)
                self._pending = (x, list(product.split(self.sizes, dim=-1)))
            parts = self._pending[1]
            if index == len(self.sizes) - 1:
                self._pending = None
            return parts[index]

        forward.fused = self  # type: ignore[attr-defined]
        return forward


Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _apply(linear: nn.Module, x: torch.Tensor, product: Product | None) -> torch.Tensor:
    """linear(x), or `product` of x with its weight and bias."""
    return linear(x) if product is None else product(x, linear.weight, linear.bias)  # type: ignore[arg-type]


def _glm_front(mlp: nn.Module, x: torch.Tensor, product: Product | None = None) -> torch.Tensor:
    """The gated activation's product of an MLP with one gate-and-up projection (GLM, Phi-3)."""
    gate, up = _apply(mlp.gate_up_proj, x, product).chunk(2, dim=-1)  # type: ignore[arg-type]
    return up * mlp.activation_fn(gate)  # type: ignore[operator]


def _llama_front(mlp: nn.Module, x: torch.Tensor, product: Product | None = None) -> torch.Tensor:
    """The gated activation's product of an MLP with separate gate and up projections (Llama, Qwen)."""
    gate = _apply(mlp.gate_proj, x, product)  # type: ignore[arg-type]
    return mlp.act_fn(gate) * _apply(mlp.up_proj, x, product)  # type: ignore[arg-type,operator]


def _gated_front(mlp: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The function computing what `mlp`'s down projection reads, if its layout is a known one."""
    if not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        return None
    if isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear) and hasattr(mlp, "activation_fn"):
        return _glm_front
    if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj")) and hasattr(
        mlp, "act_fn"
    ):
        return _llama_front
    return None


def _split(
    mlp: nn.Module,
    whole: Callable[[torch.Tensor], torch.Tensor],
    front: Callable[..., torch.Tensor],
    one_row: Callable[..., torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's forward: at one-row steps inside compiled(), `front` then the down projection apart."""
    down: nn.Linear = mlp.down_proj  # type: ignore[assignment]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _on() and _one_row(x):
            return one_row(forward.fused(mlp, x), down.weight, down.bias)  # type: ignore[attr-defined]
        return whole(x)

    forward.fused = front  # type: ignore[attr-defined]
    return forward


def fusable(model: nn.Module) -> bool:
    """Whether the model's attention layers have separate, unquantized query/key/value Linears."""
    found = False
    for module in model.modules():
        parts = [getattr(module, name, None) for name in PROJECTIONS]
        if any(isinstance(p, nn.Linear) for p in parts):
            if not all(type(p) is nn.Linear and type(p.weight) is nn.Parameter for p in parts):
                return False
            found = True
    return found


def fuse(
    model: nn.Module, options: Fusion = NOTHING_MORE, backend: str | Callable[..., Any] = "inductor"
) -> list[str]:
    """Give the model's norms, MLPs and rotary embedding function compiled versions; returns which.

    The modules' forward methods (and module-level functions: the modeling module's rotary
    embedding, the slots' decode attention) are replaced by ones that run the compiled version inside
    `compiled()` and the eager one elsewhere. Compilation happens at the first call inside
    `compiled()`; `unfuse` undoes everything but the query/key/value concatenation, whose views
    behave as the separate weights did.

    Args:
        model: The causal LM.
        options: What is compiled besides norms, MLPs and the rotary embedding.
        backend: torch.compile's backend ("eager" in tests: dynamo alone, same numbers; or a callable).
    """
    if options.tune:
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
    compiler = functools.partial(_compile, backend=backend, static=options.static)
    names: set[str] = set()
    inside: set[int] = set()  # modules already inside a compiled piece
    # A one-row product, shared by every layer: the fixed kernel (also what compiled pieces call for
    # theirs), or compiled (recompiled per shape).
    product = gemv.product if options.gemv else None
    one_row = product or compiler(_linear)
    if product is not None:
        names.add("one-row products (llm_server.gemv)")
    for module in model.modules():
        name = type(module).__name__
        if name.endswith((NORM_SUFFIX, MLP_SUFFIX)):
            module.forward = _either(module.forward, compiler)  # type: ignore[method-assign]
            inside.update(id(m) for m in module.modules())
            names.add(name)
        front = _gated_front(module) if options.split_mlp and name.endswith(MLP_SUFFIX) else None
        if front is not None:
            piece = compiler(front if product is None else functools.partial(front, product=product))
            module.forward = _split(module, module.forward, piece, one_row)  # type: ignore[method-assign]
            names.add(f"{name} (split at one row)")
    if options.qkv and fusable(model):
        for module in model.modules():
            if isinstance(getattr(module, PROJECTIONS[0], None), nn.Linear):
                projections = [getattr(module, p) for p in PROJECTIONS]
                FusedQKV(projections, one_row)
                inside.update(id(p) for p in projections)
        names.add("FusedQKV")
    if options.linears != "none":
        one_row_only = options.linears == "one-row"
        names |= _fuse_linears(model, compiler, inside, one_row_only, product)
    modeling = sys.modules.get(type(model).__module__)
    if modeling is not None and _patch(modeling, ROPE_FUNCTION, compiler):
        names.add(f"{modeling.__name__}.{ROPE_FUNCTION}")
    kernel = options.attention
    dynamic = functools.partial(_compile, backend=backend, static=False)  # columns change every bucket
    if kernel and _patch(attention, "decode", dynamic, functools.partial(attention.decode, kernel=kernel)):
        names.add(f"{attention.__name__}.decode ({kernel})")
    return sorted(names)


def _fuse_linears(
    model: nn.Module,
    compiler: Callable[[Callable[..., Any]], Callable[..., Any]],
    inside: set[int],
    one_row: bool,
    product: Product | None = None,
) -> set[str]:
    """Compile the Linears not `inside` a compiled piece (for one-row steps only, with `one_row`).

    With `product`, a one-row step calls it with the Linear's weight and bias instead, and the other
    steps run the compiled Linear (or, with `one_row`, the eager one).
    """
    names = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in inside:
            forward = module.forward if one_row else _either(module.forward, compiler)
            if product is not None:
                forward = _either(forward, functools.partial(_product_forward, module, product), _one_row)
            elif one_row:
                forward = _either(forward, compiler, _one_row)
            module.forward = forward  # type: ignore[method-assign]
            names.add(f"{type(module).__name__} (one row)" if one_row else type(module).__name__)
    return names


def _product_forward(linear: nn.Module, product: Product, _eager: Callable[..., Any]) -> Callable[..., Any]:
    """A Linear's forward as `product` of the input with its weight and bias (for `_either`)."""
    return functools.partial(_apply, linear, product=product)


def _patch(
    module: Any,
    function: str,
    compiler: Callable[[Callable[..., Any]], Callable[..., Any]],
    fused: Callable[..., Any] | None = None,
) -> bool:
    """Replace module.function by its `_either` (once); True if it is patched now."""
    eager = getattr(module, function, None)
    if not callable(eager) or hasattr(module, _EAGER + function):
        return False
    setattr(module, _EAGER + function, eager)
    setattr(module, function, _either(eager, compiler, fused=fused))
    return True


def unfuse(model: nn.Module) -> None:
    """Undo `fuse`: the eager forwards and module-level functions again."""
    for module in model.modules():
        if hasattr(vars(module).get("forward"), "fused"):
            del module.forward
    patched: list[tuple[Any, str]] = [
        (sys.modules.get(type(model).__module__), ROPE_FUNCTION),
        (attention, "decode"),
    ]
    for owner, function in patched:
        eager = getattr(owner, _EAGER + function, None)
        if eager is not None:
            setattr(owner, function, eager)
            delattr(owner, _EAGER + function)
