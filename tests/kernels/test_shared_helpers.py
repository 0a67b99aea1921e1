"""The helpers that hold one fact each for the ops and for the engine: the accumulation dtype, the
segment sum, the head's logits sum and the ZeRO-3 tests, against plain float64 computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpo.kernels import checks
from fastpo.kernels.dtypes import accumulation_dtype
from fastpo.kernels.linear_logprobs import linear_logits_sum, linear_sequence_logps
from fastpo.kernels.logprobs import reduce_sequences, segment_sum
from fastpo.kernels.zero3 import find_lm_head, full_shape, is_zero3_parameter, resolve_lm_head


def test_accumulation_dtype():
    half = torch.zeros(2, dtype=torch.bfloat16)
    assert accumulation_dtype(half) == torch.float32
    assert accumulation_dtype(torch.float16, None, half) == torch.float32
    assert accumulation_dtype(half, None, torch.zeros(1, dtype=torch.float64)) == torch.float64
    assert accumulation_dtype(torch.float64) == torch.float64
    assert accumulation_dtype() == torch.float32


def test_segment_sum_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, -1, 1, 2, 2], [4, 4, 4, -1, -1, 0, 1], [1, 1, 1, 1, 1, 1, 1]])
    got = segment_sum(values, ids, 6)
    want = torch.zeros(6, dtype=torch.float64)
    for value, s in zip(values.detach().reshape(-1).tolist(), ids.reshape(-1).tolist()):
        if s >= 0:
            want[s] += value
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got[3] == 0 and got[5] == 0  # sequences with no token
    got.sum().backward()  # every token of a sequence gets gradient 1, tokens of none 0
    torch.testing.assert_close(values.grad, (ids >= 0).double())
    # the ops' reduction uses the same sum
    sums, counts = reduce_sequences(values.detach(), ids >= 0, sequence_ids=ids, num_sequences=6)
    torch.testing.assert_close(sums, want, rtol=0, atol=1e-12)
    assert counts.tolist() == [3, 10, 2, 0, 3, 0]


@pytest.mark.parametrize("ids, num, error, message", [
    (torch.tensor([0, 3]), 3, ValueError, r"sequence_ids 3 at position \(1,\) is outside "
                                          r"\[-1, num_sequences=3\)"),
    (torch.tensor([0, -2]), 3, ValueError, r"sequence_ids -2 at position \(1,\)"),
    (torch.tensor([0, 1, 2]), 3, ValueError, r"sequence_ids shape \(3,\) does not match values "
                                             r"shape \(2,\)"),
    (torch.tensor([0.0, 1.0]), 3, TypeError, r"sequence_ids must be an integer tensor"),
    (torch.tensor([0, 1]), -1, ValueError, r"num_sequences must be an int >= 0, got -1"),
    ([0, 1], 3, TypeError, r"sequence_ids must be a tensor, got list"),
])
def test_segment_sum_refuses_bad_ids(ids, num, error, message):
    with pytest.raises(error, match=message):
        segment_sum(torch.ones(2), ids, num)


def _logits64(hidden, weight, bias, scale, cap):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    return z if cap is None else torch.tanh(z / cap) * cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_linear_logits_sum_against_float64(dtype, cap):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 12, generator=gen).to(dtype)
    weight = (torch.randn(37, 12, generator=gen) * 0.5).to(dtype)
    bias = torch.randn(37, generator=gen).to(dtype)
    got = linear_logits_sum(hidden, weight, bias, logit_scale=0.7, softcap=cap, chunk_tokens=3)
    assert got.shape == (2, 5) and got.dtype == accumulation_dtype(dtype)
    assert not got.requires_grad
    want = _logits64(hidden, weight, bias, 0.7, cap).sum(-1)
    if dtype == torch.bfloat16 and cap is not None:  # the logits rounded to bf16, as the model's
        tol = 37 * 3.0 * 2**-8
    else:
        tol = 37 * 8.0 * (2**-20 if dtype != torch.float64 else 2**-45)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


def test_sequence_logits_sum_is_the_raw_head_sum():
    """``linear_sequence_logps(with_logits_sum=True)``: raw logits (before scale / soft-cap) of the
    scored tokens, summed per sequence."""
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(2, 6, 8, generator=gen), torch.randn(19, 8, generator=gen)
    labels = torch.randint(0, 19, (2, 6), generator=gen)
    labels[0, :2] = -100
    labels[1] = -100
    out = linear_sequence_logps(hidden, weight, labels, with_logits_sum=True, softcap=2.0,
                                logit_scale=0.5)
    raw = _logits64(hidden, weight, None, 1.0, None).sum(-1) * (labels != -100)
    torch.testing.assert_close(out.logits_sum.double(), raw.sum(-1), rtol=0, atol=1e-4)
    assert out.logits_sum[1] == 0


def test_linear_logits_sum_refuses_bad_input():
    hidden, weight = torch.zeros(3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"expected weight of shape \[V, 4\]"):
        linear_logits_sum(hidden, weight[:, :3])
    with pytest.raises(ValueError, match="softcap must be finite and > 0"):
        linear_logits_sum(hidden, weight, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        linear_logits_sum(hidden, weight, softcap=1.0, chunk_tokens=0)
    with pytest.raises(TypeError, match=r"bias must be a tensor or None, got list"):
        linear_logits_sum(hidden, weight, [0.0] * 5)


def test_check_tensors_names_every_input():
    with pytest.raises(TypeError, match=r"^hidden, weight and labels must be tensors, got Tensor, "
                                        r"list and Tensor$"):
        checks.check_tensors(hidden=torch.zeros(1), weight=[1], labels=torch.zeros(1))
    with pytest.raises(TypeError, match=r"^values must be a tensor, got int$"):
        checks.check_tensors(values=3)
    checks.check_tensors(bias=None, weight=torch.zeros(1), optional=("bias",))


class _CausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 9)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_lm_head_and_zero3_helpers():
    model = _CausalLM()
    assert find_lm_head(model) is model.head
    assert resolve_lm_head(model) == (model.head.weight, model.head.bias)
    with pytest.raises(TypeError, match="Sequential has no output embeddings"):
        find_lm_head(nn.Sequential())
    with pytest.raises(TypeError, match=r"has no output embeddings with a weight \[V, H\]"):
        resolve_lm_head(nn.LayerNorm(4))  # a 1-D weight is no head
    plain = model.head.weight
    assert not is_zero3_parameter(plain) and not is_zero3_parameter(None)
    assert full_shape(plain) == (9, 4)
    # a ZeRO-3 partitioned parameter: an empty local shard, the whole shape in ds_shape
    shard = nn.Parameter(torch.empty(0))
    shard.ds_id, shard.ds_shape = 7, torch.Size([9, 4])
    assert is_zero3_parameter(shard) and full_shape(shard) == (9, 4)
