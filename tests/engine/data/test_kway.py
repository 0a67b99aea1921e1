"""K-way rows [prompt | c1 | ... | cK]: every completion's logps and every parameter gradient
equal those of the same sequences in padded rows (fp32, 1e-5 relative), through segment attention
(pieces and one dense-masked call), the dense 4-D mask fallback and eager attention; the layout
(positions restarting after the prompt, targets, mask) spelled out."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_shared_prompt import tiny_llama as shared_tiny_llama
from transformers import LlamaForCausalLM

from fastpo.engine.data.batch import collate_ranked
from fastpo.engine.data.ranked import TokenizedRanked
from fastpo.engine.data.segments import BRANCH, CAUSAL, PAD
from fastpo.engine.data.shared_prompt import shared_prompt_attention_mask
from fastpo.engine.model.attention import dense_attention, forced_mode
from fastpo.engine.model.forward import forward_logps

# K = 4, 2, 3 and 5; a one-token prompt, one-token completions, ragged lengths
SHAPES = [(5, [3, 7, 1, 4]), (1, [4, 1]), (9, [2, 2, 6]), (3, [1, 5, 2, 3, 1])]


def make_items(vocab: int, shapes=SHAPES, seed: int = 3) -> list[TokenizedRanked]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [TokenizedRanked(ids(p), [ids(n) for n in sizes],
                            [float(k % 3) - 0.5 * k for k in range(len(sizes))])
            for p, sizes in shapes]


def tiny_llama(attn: str) -> LlamaForCausalLM:
    return shared_tiny_llama(attn, vocab=97)


def run(model, batch, fused: bool):
    model.zero_grad()
    out = forward_logps(model, batch, use_fused_linear=fused)
    # weight the completions differently so that every gradient path is checked
    weights = torch.linspace(0.5, 1.5, out.sequence.logps.shape[0])
    (out.sequence.logps * weights).sum().backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_grads_close(grads, ref_grads):
    for name, g in ref_grads.items():
        # 1e-5 relative to the tensor's scale (an element near 0 is compared absolutely)
        scale = g.abs().max().item()
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("attn", ["sdpa-pieces", "sdpa-dense", "sdpa-mask", "eager"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "one-row"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "from-logits"])
def test_kway_rows_equal_padded_rows(attn, padding_free, fused):
    """sdpa-pieces / sdpa-dense: segment attention per piece / in one masked call;
    sdpa-mask: the 4-D boolean mask fallback; eager: the additive mask."""
    model = tiny_llama("eager" if attn == "eager" else "sdpa")
    items = make_items(model.config.vocab_size)
    ref, ref_grads = run(model, collate_ranked(items, pad_token_id=0), fused)
    batch = collate_ranked(items, pad_token_id=0, share_prompt=True, padding_free=padding_free)
    context = {"sdpa-pieces": forced_mode("pieces"), "sdpa-dense": forced_mode("dense"),
               "sdpa-mask": dense_attention()}.get(attn, contextlib.nullcontext())
    with context:
        out, grads = run(model, batch, fused)
    runs = model.config.num_hidden_layers if attn in ("sdpa-pieces", "sdpa-dense") else 0
    assert batch.attention_plan.calls == runs
    torch.testing.assert_close(out.sequence.logps, ref.sequence.logps, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.sequence.num_tokens, ref.sequence.num_tokens)
    assert_grads_close(grads, ref_grads)
    # each prompt ran once: p + Σ n_k tokens per item instead of K·p + Σ n_k
    assert batch.num_tokens == sum(p + sum(s) for p, s in SHAPES)
    assert batch.num_sequence_tokens == sum(len(s) * p + sum(s) for p, s in SHAPES)


def test_kway_layout_positions_targets_and_mask():
    item = TokenizedRanked([11, 12], [[21, 22], [31], [41, 42, 43]], [1.0, 3.0, 2.0])
    batch = collate_ranked([item], pad_token_id=0, share_prompt=True, indices=[6])
    assert batch.input_ids.tolist() == [[11, 12, 21, 22, 31, 41, 42, 43]]
    # every completion restarts at the prompt's length
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 2, 3, 4]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 0, 1, 2, 2, 2]]
    assert batch.shared_prompt.branch_ids.tolist() == [[0, 0, 1, 1, 2, 3, 3, 3]]
    # the prompt's last position (1) scores every completion's first token
    assert batch.target_index.tolist() == [1, 2, 1, 1, 5, 6]
    assert batch.shared_prompt.target_labels.tolist() == [21, 22, 31, 41, 42, 43]
    assert batch.target_sequence.tolist() == [0, 0, 1, 2, 2, 2]
    assert [(p.kind, p.length, p.prompt) for p in batch.attention_plan.rows[0]] == [
        (CAUSAL, 4, 0), (BRANCH, 1, 2), (BRANCH, 3, 2)]
    mask = shared_prompt_attention_mask(batch, tiny_llama("sdpa").config, torch.float32)[0, 0]
    # completion 3's tokens (5..7) see the prompt and themselves, never completions 1 or 2
    assert mask[7].tolist() == [True, True, False, False, False, True, True, True]
    assert mask[4].tolist() == [True, True, False, False, True, False, False, False]
    # pairs (all): ranking 1 > 2 > 0 by score; indices and the dataset index travel
    g = batch.ranked
    assert list(zip(g.pair_chosen.tolist(), g.pair_rejected.tolist())) == [(1, 2), (1, 0),
                                                                            (2, 0)]
    assert g.order.tolist() == [[1, 2, 0]] and g.dataset_indices == (6,)
    assert batch.num_pairs == 3 and batch.num_sequences == 3


def test_packed_kway_rows_and_padding():
    items = make_items(50, [(2, [1, 2]), (3, [2, 1, 1])])
    batch = collate_ranked(items, pad_token_id=0, share_prompt=True, padding_free=True,
                           pad_to_multiple_of=8)
    assert batch.input_ids.shape == (1, 16)
    kinds = [p.kind for p in batch.attention_plan.rows[0]]
    assert kinds == [CAUSAL, BRANCH, CAUSAL, BRANCH, BRANCH, PAD]
    assert batch.position_ids[0, :12].tolist() == [0, 1, 2, 2, 3, 0, 1, 2, 3, 4, 3, 3]


def test_bad_kway_input_is_named():
    good = TokenizedRanked([1], [[2], [3]], [1.0, 0.0])
    with pytest.raises(ValueError, match="item 0 has an empty completion 1"):
        collate_ranked([TokenizedRanked([1], [[2], []], [1.0, 0.0])], pad_token_id=0,
                       share_prompt=True)
    with pytest.raises(ValueError, match="item 1: 1 completions and 1 scores"):
        collate_ranked([good, TokenizedRanked([1], [[2]], [1.0])], pad_token_id=0)
    with pytest.raises(ValueError, match="no pair in this batch"):
        collate_ranked([TokenizedRanked([1], [[2], [3]], [1.0, 1.0])], pad_token_id=0)
    with pytest.raises(ValueError, match="no pair in this batch"):
        collate_ranked([good], pad_token_id=0, margin=1.0)
