"""Shared-prompt pairs: one [prompt | chosen | rejected] segment per pair gives the same logps and
gradients as the concatenated batch, with the mask, positions and targets spelled out."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastpo.engine.data.batch import collate_pairs, plan_batches
from fastpo.engine.data.dataset import DataStats, TokenizedDataset, TokenizedPair
from fastpo.engine.data.segments import BRANCH, CAUSAL, PAD
from fastpo.engine.data.shared_prompt import shared_prompt_attention_mask
from fastpo.engine.model.attention import dense_attention
from fastpo.engine.model.forward import forward_logps

# ragged on purpose: a one-token prompt, a one-token completion, rejected longer than chosen
SHAPES = [(5, 3, 7), (1, 4, 1), (9, 2, 2)]


def make_pairs(vocab: int, shapes=SHAPES, seed: int = 1) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r))
            for p, c, r in shapes]


def tiny_llama(attn: str, vocab: int = 101) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         initializer_range=0.2, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def run(model, batch, fused: bool):
    model.zero_grad()
    out = forward_logps(model, batch, use_fused_linear=fused, with_tail_logps=True)
    # weight the sequences differently so that every gradient path is checked
    weights = torch.linspace(0.5, 1.5, out.sequence.logps.shape[0])
    (out.sequence.logps * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out, grads


@pytest.mark.parametrize("attn", ["sdpa", "sdpa-dense-mask", "eager"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "one-row"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "from-logits"])
def test_same_logps_and_gradients_as_the_concatenated_batch(attn, padding_free, fused):
    """sdpa: segment attention (per-piece SDPA, fastpo.engine.model.attention); sdpa-dense-mask: the
    fallback's 4-D boolean mask; eager: the additive mask."""
    model = tiny_llama(attn.removesuffix("-dense-mask"))
    pairs = make_pairs(model.config.vocab_size)
    ref, ref_grads = run(model, collate_pairs(pairs, pad_token_id=0), fused)
    batch = collate_pairs(pairs, pad_token_id=0, share_prompt=True, padding_free=padding_free)
    with dense_attention() if attn == "sdpa-dense-mask" else contextlib.nullcontext():
        out, grads = run(model, batch, fused)
    runs = model.config.num_hidden_layers if attn == "sdpa" else 0
    assert batch.attention_plan.calls == runs
    torch.testing.assert_close(out.sequence.logps, ref.sequence.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tail_logps, ref.tail_logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequence.num_tokens, ref.sequence.num_tokens)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # the prompts ran once: p + c + r tokens per pair instead of 2p + c + r
    assert batch.num_tokens == sum(p + c + r for p, c, r in SHAPES)
    assert batch.num_sequence_tokens == sum(2 * p + c + r for p, c, r in SHAPES)


def test_layout_positions_targets_and_mask():
    pair = TokenizedPair(prompt_ids=[11, 12, 13], chosen_ids=[21, 22], rejected_ids=[31, 32, 33])
    short = TokenizedPair(prompt_ids=[14], chosen_ids=[23], rejected_ids=[34])
    batch = collate_pairs([pair, short], pad_token_id=0, share_prompt=True, indices=[4, 7])
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 32, 33],
                                        [14, 23, 34, 0, 0, 0, 0, 0]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert batch.position_ids[1, :3].tolist() == [0, 1, 1]
    # chosen 0, chosen 1, rejected 0, rejected 1; rejected[0] is scored at the prompt's end
    assert batch.target_index.tolist() == [2, 3, 8 + 0, 2, 5, 6, 8 + 0]
    assert batch.shared_prompt.target_labels.tolist() == [21, 22, 23, 31, 32, 33, 34]
    assert batch.target_sequence.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert batch.completion_tokens.tolist() == [2, 1, 3, 1]
    # LD-DPO's tail: the rejected token past min(|chosen|, |rejected|) = 2 of the first pair
    assert batch.target_tail.tolist() == [False, False, False, False, False, True, False]
    assert batch.num_pairs == 2 and batch.num_sequences == 4 and batch.prompt_shared
    assert batch.indices.tolist() == [4, 7]
    # segment attention: [prompt | chosen] causal, rejected over its prompt, then padding
    plan = batch.attention_plan
    assert [[(p.kind, p.length, p.prompt) for p in row] for row in plan.rows] == [
        [(CAUSAL, 5, 0), (BRANCH, 3, 3)], [(CAUSAL, 2, 0), (BRANCH, 1, 1), (PAD, 5, 0)]]

    config = LlamaConfig(attn_implementation="sdpa")
    mask = shared_prompt_attention_mask(batch, config, torch.float32)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    m = mask[0, 0].int().tolist()
    assert m[4] == [1, 1, 1, 1, 1, 0, 0, 0]  # chosen sees prompt + chosen, causally
    assert m[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected never sees chosen
    assert m[7] == [1, 1, 1, 0, 0, 1, 1, 1]
    assert mask[1, 0, 3].int().tolist() == [0, 0, 0, 1, 0, 0, 0, 0]  # padding: itself only
    assert mask[1, 0, 2].int().tolist() == [1, 0, 1, 0, 0, 0, 0, 0]

    eager = shared_prompt_attention_mask(batch, LlamaConfig(attn_implementation="eager"),
                                         torch.bfloat16)
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, mask)
    # moving the batch moves the shared-prompt tensors too
    moved = batch.to("meta").shared_prompt
    assert moved.segment_ids.device.type == moved.target_labels.device.type == "meta"
    assert moved.prompt_tokens == 4 and batch.shared_prompt.segment_ids.device.type == "cpu"


def test_unsupported_attention_and_short_sliding_window_are_refused():
    batch = collate_pairs(make_pairs(50), pad_token_id=0, share_prompt=True)
    flash = LlamaConfig()
    flash._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="SDPA or eager"):
        shared_prompt_attention_mask(batch, flash, torch.float32)
    windowed = LlamaConfig(attn_implementation="sdpa")
    windowed.sliding_window = 4
    with pytest.raises(ValueError, match="sliding window"):
        shared_prompt_attention_mask(batch, windowed, torch.float32)


def test_bad_pairs_name_the_pair():
    pairs = make_pairs(50)
    pairs[1] = TokenizedPair(prompt_ids=[1, 2], chosen_ids=[], rejected_ids=[3])
    with pytest.raises(ValueError, match="pair 1 has an empty chosen"):
        collate_pairs(pairs, pad_token_id=0, share_prompt=True)


def test_token_budget_counts_one_row_per_pair():
    dataset = TokenizedDataset(make_pairs(50, [(10, 5, 5)] * 4), [], DataStats(), {})
    shared = plan_batches(dataset, max_tokens_per_batch=40, shuffle=False, share_prompt=True)
    concatenated = plan_batches(dataset, max_tokens_per_batch=40, shuffle=False)
    assert shared == [[0, 1], [2, 3]]  # 2 rows × 20 tokens
    assert concatenated == [[0], [1], [2], [3]]  # 2 rows × 15 tokens each
