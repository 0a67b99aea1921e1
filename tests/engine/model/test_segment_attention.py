"""Segment attention (fastpo.engine.model.attention): per-piece SDPA and its one dense-masked
call equal the dense-mask attention of packed and shared-prompt rows, forward and gradients,
against a float64 reference; the cost estimate picks between them per batch; the model path runs
it (also under gradient checkpointing) and falls back or fails loudly where it can't."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastpo.engine.data import attention_cost as C
from fastpo.engine.data import segments as S
from fastpo.engine.data.batch import collate_pairs
from fastpo.engine.data.dataset import TokenizedPair
from fastpo.engine.model import attention as A
from fastpo.engine.model.forward import forward_logps


def dense_allowed(plan: S.SegmentPlan) -> torch.Tensor:
    """``[R, L, L]`` bool: what each query may see, spelled out from the plan."""
    allowed = torch.zeros(len(plan.rows), plan.width, plan.width, dtype=torch.bool)
    for r, pieces in enumerate(plan.rows):
        start = source = 0  # source: the last causal piece, whose prompt a branch sees
        for p in pieces:
            stop = start + p.length
            if p.kind == S.CAUSAL:
                source = start
            for q in range(start, stop):
                if p.kind == S.CAUSAL:
                    allowed[r, q, start: q + 1] = True
                elif p.kind == S.BRANCH:
                    allowed[r, q, source: source + p.prompt] = True
                    allowed[r, q, start: q + 1] = True
            start = stop
    return allowed


def reference_attention(q, k, v, allowed, scale):
    """float64 softmax attention; rows with no visible key give 0."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2)  # [R, L, H, D]


def padded_rows(allowed: torch.Tensor) -> torch.Tensor:
    return ~allowed.any(-1)


PLANS = {
    "packed": lambda: S.packed_plan([5, 1, 9, 3], 21),  # a one-token sequence, tail padding
    "shared-rows": lambda: S.shared_prompt_plan([[(4, 3, 6)], [(1, 1, 1)], [(7, 2, 3)]], 13),
    "shared-one-row": lambda: S.shared_prompt_plan([[(4, 3, 6), (1, 1, 1), (7, 2, 3)]], 29),
    # K-way rows [p | c1 | ... | cK]: K = 4, 2, 3 (one-token parts), then one packed row
    "kway-rows": lambda: S.shared_prompt_plan([[(4, 3, 6, 2, 5)], [(1, 1, 1)], [(3, 1, 2, 4)]],
                                              20),
    "kway-one-row": lambda: S.shared_prompt_plan([[(4, 3, 6, 2, 5), (2, 1, 1, 1), (3, 5, 2)]],
                                                 42),
}


@pytest.mark.parametrize("mode", ["pieces", "dense"])
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)], ids=["gqa", "mha"])
def test_segment_attention_matches_float64_dense_mask(plan_name, dtype, heads, mode):
    plan = PLANS[plan_name]()
    h, hkv = heads
    rows, width, dim = len(plan.rows), plan.width, 10  # head dim not a power of two
    g = torch.Generator().manual_seed(0)
    # transformers hands q/k/v as transposed views of [R, L, H, D] projections: strided input
    q = torch.randn(rows, width, h, dim, generator=g).to(dtype).transpose(1, 2)
    k = (2 * torch.randn(rows, width, hkv, dim, generator=g)).to(dtype).transpose(1, 2)
    v = torch.randn(rows, width, hkv, dim, generator=g).to(dtype).transpose(1, 2)
    for t in (q, k, v):
        t.requires_grad_(True)
    scale = dim ** -0.5
    out = A.segment_attention(q, k, v, plan, scale=scale, mode=mode)
    assert out.shape == (rows, width, h, dim) and out.dtype == dtype
    allowed = dense_allowed(plan)
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_inputs, allowed, scale)
    grad_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (out.double() * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for name, t, r in zip("qkv", (q, k, v), ref_inputs):
            torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-5, atol=1e-5,
                                       msg=f"grad {name}")
    else:
        # bf16: no further from float64 than torch's own dense-mask SDPA in bf16
        dense = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        dense_out = torch.nn.functional.scaled_dot_product_attention(
            *dense, attn_mask=allowed[:, None], scale=scale, enable_gqa=h != hkv).transpose(1, 2)
        (dense_out.double() * grad_out).sum().backward()
        real = ~padded_rows(allowed)[..., None, None].expand_as(ref)
        pairs = [(out, ref, dense_out, "out")] + [
            (t.grad, r.grad, d.grad, f"grad {n}") for n, t, r, d in zip("qkv", (q, k, v),
                                                                       ref_inputs, dense)]
        for got, want, fallback, name in pairs:
            mask = real if name == "out" else torch.ones_like(want, dtype=torch.bool)
            err = (got.double() - want)[mask].abs().max()
            bound = (fallback.double() - want)[mask].abs().max()
            assert err <= 1.5 * bound + 1e-3, f"{name}: {err} vs dense bf16 {bound}"
    # padding produces 0 and takes no gradient from anything
    padded = padded_rows(allowed)
    assert torch.equal(out.detach()[padded], torch.zeros_like(out.detach()[padded]))


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_dense_mask_is_the_plan_spelled_out(plan_name):
    plan = PLANS[plan_name]()
    allowed = dense_allowed(plan)
    eye = torch.eye(plan.width, dtype=torch.bool).expand_as(allowed)
    expected = torch.where(padded_rows(allowed)[..., None], eye, allowed)
    assert torch.equal(A.dense_mask(plan, torch.device("cpu"))[:, 0], expected)


def test_the_estimate_picks_pieces_or_a_dense_call_per_batch():
    def pick(plan, threads=2, device="cpu"):
        return C.choose_attention(plan, heads=9, head_dim=64, device_type=device,
                                  threads=threads)

    # short [p | c | r] rows: the fixed cost of four calls outweighs the pairs they skip
    assert pick(S.shared_prompt_plan([[(32, 32, 32)]] * 2, 96)) == "dense"
    # long ones, and packed rows (whose dense square grows with every sequence): pieces
    assert pick(S.shared_prompt_plan([[(128, 128, 128)]] * 2, 384)) == "pieces"
    assert pick(S.packed_plan([64] * 4, 256)) == "pieces"
    assert pick(S.packed_plan([300, 200, 250, 280], 1100)) == "pieces"
    # one piece per row (no pair to skip): one batched call
    assert pick(S.SegmentPlan(128, ((S.Piece(S.CAUSAL, 128),),) * 4)) == "dense"
    # the costs behind it: a CPU call computes its whole square; CUDA skips causal blocks
    cpu, cuda = C.device_costs("cpu", 2), C.device_costs("cuda")
    causal = C.Call(1, 100, 100, causal_tail=100)
    assert C.computed_pairs(causal, cpu) == 100 * 100
    assert C.computed_pairs(causal, cuda) == 100 * 101 / 2
    assert C.computed_pairs(C.Call(2, 10, 30, 10, masked=True), cuda) == 600
    # one row's backward splits its 9 heads over 2 threads: 5 and 4
    assert C._load_balance(C.Call(1, 8, 8), 9, cpu) == pytest.approx(0.25 + 0.75 * 10 / 9)
    assert C._load_balance(C.Call(2, 8, 8), 9, cpu) == 1.0


def test_the_choice_is_made_once_per_batch_and_can_be_forced():
    model = tiny()
    batch = collate_pairs(pairs(), pad_token_id=0, share_prompt=True)
    plan = batch.attention_plan
    forward_logps(model, batch)
    assert plan.cache["mode"] in ("pieces", "dense") and plan.calls == 2
    plan.cache["mode"] = "dense"  # kept: the next forward (e.g. the reference's) reuses it
    forward_logps(model, batch)
    assert "dense_mask" in plan.cache
    with A.forced_mode("pieces"):
        assert A.attention_mode(plan, torch.zeros(1, 4, 1, 8)) == "pieces"
    assert A.attention_mode(plan, torch.zeros(1, 4, 1, 8)) == "dense"
    with pytest.raises(ValueError, match="mode must be 'pieces', 'dense' or None, got 'flex'"):
        with A.forced_mode("flex"):
            pass


def test_cost_and_plan_checks():
    plan = S.shared_prompt_plan([[(4, 3, 6)]], 15)
    # [p | c] causal: 7·8/2 pairs; rejected: 6 queries × 4 prompt keys + 6·7/2 causal
    assert S.attention_pairs(plan) == 28 + 24 + 21 == int(dense_allowed(plan).sum())
    assert S.attention_pairs(S.packed_plan([3, 4], 9)) == 6 + 10
    with pytest.raises(ValueError, match="pieces cover 7 tokens of 9"):
        S.SegmentPlan(9, ((S.Piece(S.CAUSAL, 7),),))
    with pytest.raises(ValueError, match="branch piece 0 needs a preceding causal piece"):
        S.SegmentPlan(3, ((S.Piece(S.BRANCH, 3, prompt=1),),))
    # K-way: branches after branches see the causal piece's prompt; a padding piece cuts that
    kway = S.shared_prompt_plan([[(2, 3, 4, 5)]], 14)
    assert [p.kind for p in kway.rows[0]] == [S.CAUSAL, S.BRANCH, S.BRANCH]
    assert S.attention_pairs(kway) == int(dense_allowed(kway).sum()) == 15 + 18 + 25
    with pytest.raises(ValueError, match="branch piece 2 needs a preceding causal piece"):
        S.SegmentPlan(6, ((S.Piece(S.CAUSAL, 3), S.Piece(S.PAD, 1),
                           S.Piece(S.BRANCH, 2, prompt=1)),))
    q = torch.zeros(1, 2, 9, 4)
    with pytest.raises(ValueError, match=r"a \[1, 9\] batch for a plan of \[1, 15\]"):
        A.segment_attention(q, q, q, plan)


# ------------------------------------------------------------------------------ model path
def tiny(attn: str = "sdpa", **overrides) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=89, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.2, attn_implementation=attn, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def pairs(vocab: int = 89) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in ((6, 4, 9), (1, 2, 1), (3, 7, 2))]


def logps_and_grads(model, batch):
    model.zero_grad()
    out = forward_logps(model, batch).sequence.logps
    (out * torch.linspace(0.5, 1.5, out.shape[0])).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["pieces", "dense"])
@pytest.mark.parametrize("layout", [dict(padding_free=True), dict(share_prompt=True),
                                    dict(share_prompt=True, padding_free=True)],
                         ids=["packed", "shared", "shared-one-row"])
def test_gradient_checkpointing_recomputes_with_the_plan(layout, mode):
    model = tiny()
    data = pairs()
    ref, ref_grads = logps_and_grads(model, collate_pairs(data, pad_token_id=0))
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()
    model.train()
    batch = collate_pairs(data, pad_token_id=0, pad_to_multiple_of=8, **layout)
    with A.forced_mode(mode):
        out, grads = logps_and_grads(model, batch)
    # every layer's forward and its recompute in the backward ran the plan
    assert batch.attention_plan.calls == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_fallbacks_keep_the_dense_mask():
    data = pairs()
    eager = tiny("eager")
    batch = collate_pairs(data, pad_token_id=0, share_prompt=True)
    forward_logps(eager, batch)
    assert batch.attention_plan.calls == 0  # eager: the dense additive mask
    sdpa = tiny()
    with A.dense_attention():
        forward_logps(sdpa, batch)
    assert batch.attention_plan.calls == 0 and A.enabled()
    # a sliding window shorter than a sequence: transformers' own packed mask applies it
    assert not A.applies(tiny(sliding_window=4).config, batch.attention_plan, batch.max_seqlen)
    assert A.applies(sdpa.config, batch.attention_plan, batch.max_seqlen)
    forward_logps(sdpa, batch)
    assert batch.attention_plan.calls == sdpa.config.num_hidden_layers


def test_a_model_that_bypasses_the_attention_interface_is_an_error(monkeypatch):
    model = tiny()
    batch = collate_pairs(pairs(), pad_token_id=0, padding_free=True)

    def ignores_the_plan(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop(A.PLAN_KWARG)
        return A._WRAPPED["sdpa"](module, query, key, value, attention_mask, **kwargs)

    A.install()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", ignores_the_plan)
    with pytest.raises(RuntimeError, match="does not dispatch through transformers' attention"):
        forward_logps(model, batch)
