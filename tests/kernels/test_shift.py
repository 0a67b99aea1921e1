"""``shift=True`` and the ``reduction`` / ``ignore_index`` conventions of the four ops.

Every result is compared with a float64 reference whose shifted labels are built by a plain loop
(not by ``shift_labels``): forward and gradients, shift on and off, packed rows, ugly inputs.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import fastpo
from fastpo.kernels import ops
from fastpo.kernels.labels import shift_labels

IGNORE = -100
FOUR_OPS = ("token_logps", "sequence_logps", "linear_token_logps", "linear_sequence_logps")


def loop_shift(labels, sequence_ids=None, ignore=IGNORE):
    """labels[t + 1] at t inside one sequence, else ignore: written as a loop over positions."""
    flat = labels.reshape(-1, labels.shape[-1]).tolist()
    ids = None if sequence_ids is None else sequence_ids.reshape(-1, labels.shape[-1]).tolist()
    out = []
    for b, row in enumerate(flat):
        new = [ignore] * len(row)
        for t in range(len(row) - 1):
            if ids is None or (ids[b][t] == ids[b][t + 1] and ids[b][t] >= 0):
                new[t] = row[t + 1]
        out.append(new)
    return torch.tensor(out, dtype=labels.dtype).reshape(labels.shape)


def reference_token_logps(logits64, labels, ignore=IGNORE, temperature=1.0):
    """float64 log softmax(logits / T)[label], 0 where ignored (differentiable)."""
    logp = torch.log_softmax(logits64 / temperature, dim=-1)
    scored = labels != ignore
    safe = torch.where(scored, labels, torch.zeros_like(labels)).long()
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, torch.zeros_like(picked))


def reference_sequences(per_token, labels, sequence_ids=None, num_sequences=None,
                        reduction="sum", ignore=IGNORE):
    scored = labels != ignore
    if sequence_ids is None:
        sums, counts = (per_token * scored).sum(-1), scored.sum(-1)
    else:
        sums = torch.stack([(per_token * scored * (sequence_ids == s)).sum()
                            for s in range(num_sequences)])
        counts = torch.stack([(scored & (sequence_ids == s)).sum() for s in range(num_sequences)])
    if reduction == "mean":
        sums = sums / counts.clamp(min=1)
    return sums, counts


def ugly_logits(layout, b, t, v, dtype, gen):
    """[b, t, v] logits in a given storage layout, with -inf entries (never at a label)."""
    base = torch.randn(b, t, v, generator=gen) * 3
    base[..., v // 2] = float("-inf")
    if layout == "transposed":
        return base.transpose(0, 1).contiguous().transpose(0, 1).to(dtype)
    if layout == "expanded":
        return base[:1].to(dtype).expand(b, t, v)
    if layout == "offset":
        storage = torch.randn(b * t * v + 11, generator=gen).to(dtype)
        view = storage[11:].view(b, t, v)
        view.copy_(base.to(dtype))
        return view
    if layout == "sliced":
        return torch.cat([base, base[..., :5]], dim=-1).to(dtype)[..., :v]
    return base.to(dtype)


def make_labels(b, t, v, gen, *, all_masked_row=True):
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[labels == v // 2] = v // 2 + 1  # never the -inf column
    labels[torch.rand(b, t, generator=gen) < 0.25] = IGNORE
    labels[:, :2] = IGNORE  # a "prompt"
    if all_masked_row:
        labels[-1] = IGNORE
    return labels




# --------------------------------------------------------------------------- the labels


def test_shift_labels_rows_and_flat_keep_dtype_and_ignore_index():
    labels = torch.tensor([[5, 6, 7, 8], [1, -1, 3, 4]], dtype=torch.int32)
    got = shift_labels(labels, -1)
    assert got.dtype == torch.int32
    assert got.tolist() == [[6, 7, 8, -1], [-1, 3, 4, -1]]
    assert shift_labels(torch.tensor([3, 4, 5])).tolist() == [4, 5, IGNORE]
    assert shift_labels(torch.tensor([3])).tolist() == [IGNORE]
    assert shift_labels(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)


def test_shift_labels_never_crosses_a_packed_boundary():
    labels = torch.tensor([[10, 11, 12, 20, 21, 0, 0], [30, 31, 40, 41, 42, 43, 44]])
    ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 2, 3, 3, 3, 3, -1]])
    got = shift_labels(labels, sequence_ids=ids)
    assert got.tolist() == [[11, 12, IGNORE, 21, IGNORE, IGNORE, IGNORE],
                            [31, IGNORE, 41, 42, 43, IGNORE, IGNORE]]
    assert torch.equal(got, loop_shift(labels, ids))


@pytest.mark.parametrize("bad, error, match", [
    (dict(labels=[1, 2]), TypeError, "labels must be a tensor"),
    (dict(labels=torch.ones(3)), TypeError, "labels must be int64 or int32"),
    (dict(labels=torch.tensor(3)), ValueError, "scalar"),
    (dict(sequence_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "sequence_ids shape"),
    (dict(sequence_ids=torch.zeros(2, 3)), TypeError, "sequence_ids must be an integer"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
])
def test_shift_labels_bad_input(bad, error, match):
    kw = dict(labels=torch.zeros(2, 3, dtype=torch.long), ignore_index=IGNORE, sequence_ids=None)
    kw.update(bad)
    with pytest.raises(error, match=match):
        shift_labels(kw["labels"], kw["ignore_index"], sequence_ids=kw["sequence_ids"])


# --------------------------------------------------------------------------- from logits


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded", "offset", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [True, False])
def test_token_logps_matches_float64(backend, layout, dtype, shift):
    gen = torch.Generator().manual_seed(3)
    b, t, v = 3, 9, 37
    logits = ugly_logits(layout, b, t, v, dtype, gen)
    labels = make_labels(b, t, v, gen)
    labels[0, 4:] = torch.tensor([3, IGNORE, 5, 6, 7])  # a last label that shift must drop
    scored_labels = loop_shift(labels) if shift else labels
    leaf = logits.detach().clone().requires_grad_() if layout != "expanded" else \
        logits.detach()[:1].clone().requires_grad_()
    x = leaf if layout != "expanded" else leaf.expand(b, t, v)
    if x is not leaf:
        x.retain_grad()  # the op's own gradient, per row, before autograd sums the rows
    out = fastpo.token_logps(x, labels, shift=shift, temperature=0.7)
    ref_leaf = leaf.detach().double().requires_grad_()
    ref_x = ref_leaf if layout != "expanded" else ref_leaf.expand(b, t, v)
    if ref_x is not ref_leaf:
        ref_x.retain_grad()
    ref = reference_token_logps(ref_x, scored_labels, temperature=0.7)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert (out[scored_labels == IGNORE] == 0).all()
    if shift:
        assert (out[:, -1] == 0).all()
    else:
        assert out[0, -1] != 0
    grad_out = torch.randn(b, t, generator=gen)
    (out * grad_out).sum().backward()
    (ref * grad_out.double()).sum().backward()
    grad = x.grad.double()
    want = ref_x.grad.nan_to_num(0.0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(grad, want, **tol)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_shift_on_padded_and_packed_rows(backend, reduction):
    gen = torch.Generator().manual_seed(5)
    v = 53
    # packed: one row holding 4 sequences of lengths 4, 1, 6, 3, then 2 tokens of no sequence
    ids = torch.tensor([[0] * 4 + [1] + [2] * 6 + [3] * 3 + [-1] * 2])
    t = ids.shape[1]
    logits = torch.randn(1, t, v, generator=gen) * 2
    labels = torch.randint(0, v, (1, t), generator=gen)
    labels[0, 7] = IGNORE  # scored from position 6 (sequence 2) once shifted
    leaf = logits.clone().requires_grad_()
    seq = fastpo.sequence_logps(leaf, labels, shift=True, reduction=reduction, sequence_ids=ids,
                                num_sequences=4)
    shifted = loop_shift(labels, ids)
    # the last token of every packed sequence (positions 3, 4, 10, 13) is not scored
    assert (shifted[0, [3, 4, 10, 13, 14, 15]] == IGNORE).all()
    ref_leaf = logits.double().requires_grad_()
    per_token = reference_token_logps(ref_leaf, shifted)
    ref, counts = reference_sequences(per_token, shifted, ids, 4, reduction)
    assert seq.num_tokens.tolist() == counts.tolist() == [3, 0, 4, 2]
    torch.testing.assert_close(seq.logps.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.5, -2.0, 1.5, 3.0])
    (seq.logps * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-6)
    # padded rows, shift on: the same as shifting by hand and passing logits[:, :-1]
    logits2 = torch.randn(3, 8, v, generator=gen)
    labels2 = make_labels(3, 8, v, gen)
    on = fastpo.sequence_logps(logits2, labels2, shift=True, reduction=reduction)
    by_hand = fastpo.sequence_logps(logits2[:, :-1], labels2[:, 1:], reduction=reduction)
    ref2, counts2 = reference_sequences(reference_token_logps(logits2.double(),
                                                              loop_shift(labels2)),
                                        loop_shift(labels2), reduction=reduction)
    torch.testing.assert_close(on.logps.double(), ref2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on.logps, by_hand.logps, rtol=1e-6, atol=1e-6)
    assert on.num_tokens.tolist() == counts2.tolist() == by_hand.num_tokens.tolist()
    assert on.logps[-1] == 0 and on.num_tokens[-1] == 0  # the all-masked row: 0, never NaN


# --------------------------------------------------------------------------- from hidden states


def linear_case(b, t, h, v, gen, dtype=torch.float32):
    hidden = torch.randn(b, t, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.4).to(dtype)
    bias = torch.randn(v, generator=gen).to(dtype)
    return hidden, weight, bias


@pytest.mark.parametrize("tiles", ["chunked", "triton"])
@pytest.mark.parametrize("shift", [True, False])
def test_linear_ops_match_float64(tiles, shift):
    gen = torch.Generator().manual_seed(7)
    b, t, h, v = 3, 7, 12, 41
    hidden, weight, bias = linear_case(b, t, h, v, gen)
    hidden = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous rows
    labels = make_labels(b, t, v, gen).to(torch.int32)
    scored = loop_shift(labels) if shift else labels
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    refs = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    with ops.use_cpu_backend("triton" if tiles == "triton" else "torch"):
        per_token = fastpo.linear_token_logps(*leaves[:2], labels, bias=leaves[2], shift=shift,
                                              temperature=1.3)
        seq = fastpo.linear_sequence_logps(*leaves[:2], labels, bias=leaves[2], shift=shift,
                                           temperature=1.3, reduction="mean")
    z = refs[0] @ refs[1].t() + refs[2]
    ref_token = reference_token_logps(z, scored, temperature=1.3)
    ref_seq, counts = reference_sequences(ref_token, scored, reduction="mean")
    torch.testing.assert_close(per_token.double(), ref_token.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq.logps.double(), ref_seq.detach(), rtol=1e-5, atol=1e-5)
    assert seq.num_tokens.tolist() == counts.tolist()
    grad_out = torch.randn(b, t, generator=gen)
    ((per_token * grad_out).sum() + seq.logps.sum()).backward()
    ((ref_token * grad_out.double()).sum() + ref_seq.sum()).backward()
    for ours, ref, name in zip(leaves, refs, ("hidden", "weight", "bias")):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_linear_sequence_logps_shift_packed():
    gen = torch.Generator().manual_seed(11)
    hidden, weight, bias = linear_case(1, 12, 8, 29, gen)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1, -1]])
    labels = torch.randint(0, 29, (1, 12), generator=gen)
    seq = fastpo.linear_sequence_logps(hidden, weight, labels, bias=bias, shift=True,
                                       sequence_ids=ids, num_sequences=3)
    shifted = loop_shift(labels, ids)
    z = hidden.double() @ weight.double().t() + bias.double()
    ref, counts = reference_sequences(reference_token_logps(z, shifted), shifted, ids, 3)
    assert seq.num_tokens.tolist() == counts.tolist() == [2, 3, 1]
    torch.testing.assert_close(seq.logps.double(), ref, rtol=1e-5, atol=1e-5)
    from_logits = fastpo.sequence_logps(z.float(), labels, shift=True, sequence_ids=ids,
                                        num_sequences=3)
    torch.testing.assert_close(seq.logps, from_logits.logps, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- conventions


def call(name, labels, **kw):
    gen = torch.Generator().manual_seed(0)
    hidden, weight, _ = linear_case(2, 5, 6, 11, gen)
    if name.startswith("linear"):
        return getattr(fastpo, name)(hidden, weight, labels, **kw)
    return getattr(fastpo, name)(hidden @ weight.t(), labels, **kw)


def test_the_four_ops_share_one_signature_convention():
    for name in FOUR_OPS:
        params = inspect.signature(getattr(fastpo, name)).parameters
        for key, default in (("ignore_index", -100), ("shift", False)):
            assert params[key].kind is inspect.Parameter.KEYWORD_ONLY, (name, key)
            assert params[key].default == default, (name, key)
        want = "none" if "token" in name else "sum"
        assert params["reduction"].default == want, name
        assert "sequence_ids" in params, name


def test_ignore_index_and_shift_mean_the_same_in_the_four_ops():
    labels = torch.tensor([[3, -1, 4, 10, 2], [-1, -1, -1, -1, -1]])
    values = {name: call(name, labels, ignore_index=-1, shift=True) for name in FOUR_OPS}
    for name in ("token_logps", "linear_token_logps"):
        assert (values[name][:, -1] == 0).all() and (values[name][:, 0] == 0).all()
        assert (values[name][1] == 0).all()
    for token_op, seq_op in (("token_logps", "sequence_logps"),
                             ("linear_token_logps", "linear_sequence_logps")):
        torch.testing.assert_close(values[token_op].sum(-1), values[seq_op].logps)
        assert values[seq_op].num_tokens.tolist() == [3, 0]
    torch.testing.assert_close(values["token_logps"], values["linear_token_logps"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FOUR_OPS)
def test_bad_conventions_are_named(name):
    labels = torch.zeros(2, 5, dtype=torch.long)
    per_token = "token" in name and "sequence" not in name
    for reduction in (("sum", "mean", "batchmean") if per_token else ("none", "batchmean", 1)):
        with pytest.raises(ValueError, match="reduction"):
            call(name, labels, reduction=reduction)
    if per_token:
        with pytest.raises(ValueError, match="sequence_logps"):
            call(name, labels, reduction="sum")
    for value in (1.5, True, "x"):
        with pytest.raises(TypeError, match="ignore_index must be an int"):
            call(name, labels, ignore_index=value)
    for value in (1, "yes", None):
        with pytest.raises(TypeError, match="shift must be True or False"):
            call(name, labels, shift=value)
    with pytest.raises(ValueError, match="sequence_ids shape"):
        call(name, labels, shift=True, sequence_ids=torch.zeros(2, 4, dtype=torch.long))
