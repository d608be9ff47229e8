"""On a GPU: llm_server.gemv's one-row kernel against F.linear and torchao, eagerly and from a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_server import gemv

pytestmark = pytest.mark.gpu

# (out, in, bias): the reference model's measured shapes, one that takes the rule, and ragged edges
# (rows not a multiple of a program's, columns not a multiple of an iteration's).
SHAPES = [
    (4608, 4096, True),
    (4096, 13696, False),
    (27392, 4096, False),
    (11008, 4096, False),
    (1001, 777, True),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features", "with_bias"), SHAPES)
def test_the_kernel_computes_what_f_linear_does(
    dtype: torch.dtype, out_features: int, in_features: int, with_bias: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, in_features, dtype=dtype, device="cuda")
    weight = torch.randn(out_features, in_features, dtype=dtype, device="cuda") / in_features**0.5
    bias = torch.randn(out_features, dtype=dtype, device="cuda") if with_bias else None
    assert gemv.fits(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    got = gemv.one_row_linear(x, weight, bias)
    assert got.shape == (1, 1, out_features) and got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=2e-2, rtol=2e-2)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemv.one_row_linear(x, weight, bias)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert torch.allclose(replayed.float(), expected, atol=2e-2, rtol=2e-2)


def test_more_rows_or_a_strided_weight_fall_back_to_f_linear() -> None:
    x = torch.randn(3, 64, dtype=torch.float16, device="cuda")
    weight = torch.randn(64, 32, dtype=torch.float16, device="cuda").t()
    assert not gemv.fits(x, weight.contiguous(), None) and not gemv.fits(x[:1], weight, None)
    assert torch.equal(gemv.one_row_linear(x[:1], weight, None), F.linear(x[:1], weight))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features", "with_bias"), SHAPES)
def test_torchao_weights_run_as_stored_and_match_torchao(
    precision: str, dtype: torch.dtype, out_features: int, in_features: int, with_bias: bool
) -> None:
    """The quantized plans' one-row products: INT8/FP8 read as stored, scaled per row, as torchao does."""
    from torchao.quantization import quantize_

    from vram.apply import _torchao_config

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=with_bias, dtype=dtype, device="cuda")
    quantize_(linear, _torchao_config(precision))
    stored, scale = gemv.unpack(linear.weight)  # type: ignore[misc]
    x = torch.randn(1, 1, in_features, dtype=dtype, device="cuda")
    assert gemv.fits(x, stored, linear.bias, scale)
    expected = linear(x).float()  # torchao's own product
    got = gemv.product(x, linear.weight, linear.bias)
    assert got.shape == (1, 1, out_features) and got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=3e-2, rtol=2e-2)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemv.product(x, linear.weight, linear.bias)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.allclose(replayed.float(), linear(x).float(), atol=3e-2, rtol=2e-2)
