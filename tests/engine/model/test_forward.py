"""Engine forward: logps equal a plain full-logits computation (padded and packed), references."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools

import pytest
import torch

from fastpo import kernels
from fastpo.engine.data import batch as B
from fastpo.engine.data import dataset as data
from fastpo.engine.model import attention as A
from fastpo.engine.model import forward as F
from fastpo.engine.model import reference as R
from fastpo.engine.model import reference_cache as RC

ATOL, RTOL = 2e-4, 1e-5  # fp32 engine vs float64 plain computation, sums of ~50 logps of ~-11


def short_pair(i: int) -> dict:
    words = " ".join(["very"] * (i % 4))
    return {"prompt": [{"role": "user", "content": f"Question {i}: is it {words} good?"}],
            "chosen": [{"role": "assistant", "content": f"Yes, {words} good." * (1 + i % 2)}],
            "rejected": [{"role": "assistant", "content": "No." * (1 + i % 3)}]}


@pytest.fixture(scope="module")
def pairs(tokenizer, demo_pairs_path):
    """Real demo pairs (truncated to 48 tokens) and short pairs of varied lengths."""
    records = data.load_preference_records(demo_pairs_path)[:3]
    records += data.load_preference_records([short_pair(i) for i in range(5)])
    dataset = data.tokenize_pairs(records, tokenizer, max_length=48, max_prompt_length=24)
    assert len(dataset) == 8
    return dataset


def collate(dataset, indices, tokenizer, packed: bool, **kw):
    return B.collate_batch(dataset, indices, pad_token_id=tokenizer.pad_token_id,
                           padding_free=packed, **kw)


def plain_logps(model, batch: B.PreferenceBatch) -> dict[str, torch.Tensor]:
    """Each sequence alone through the full model (lm_head included) in float64:
    logits → log_softmax → gather, summed over the scored labels."""
    model64 = copy.deepcopy(model).double()
    out: dict[str, list] = {"logps": [], "logits_sum": [], "sum_sq": [], "tail": []}
    tails = batch.target_tail
    for s in range(batch.num_sequences):
        where = batch.sequence_ids == s
        ids, labels = batch.input_ids[where], batch.labels[where]
        logits = model64(input_ids=ids[None]).logits[0]
        scored = labels != -100
        logp = logits.log_softmax(-1)[scored].gather(-1, labels[scored][:, None]).squeeze(1)
        out["logps"].append(logp.sum())
        out["logits_sum"].append(logits[scored].sum())
        out["sum_sq"].append(torch.logsumexp(2 * logits[scored].log_softmax(-1), -1).sum())
        if tails is not None:
            out["tail"].append(logp[tails[batch.target_sequence == s]].sum())
    return {k: torch.stack(v) for k, v in out.items() if v}


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double().detach(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "from_logits"])
def test_engine_logps_equal_plain_forward(tiny_model, tokenizer, pairs, packed, fused):
    batch = collate(pairs, [0, 3, 4, 7], tokenizer, packed, pad_to_multiple_of=8)
    out = F.forward_logps(tiny_model, batch, use_fused_linear=fused, with_logits_sum=True,
                          with_tail_logps=True, with_log_sum_sq_probs=True)
    ref = plain_logps(tiny_model, batch)
    close(out.sequence.logps, ref["logps"])
    close(out.tail_logps, ref["tail"])
    close(out.log_sum_sq_probs, ref["sum_sq"])
    torch.testing.assert_close(out.sequence.logits_sum.double(), ref["logits_sum"].detach(),
                               atol=2e-3, rtol=1e-5)
    assert out.sequence.logps.dtype == torch.float32
    assert out.sequence.num_tokens.tolist() == [
        int((batch.labels[batch.sequence_ids == s] != -100).sum()) for s in range(8)]
    assert (out.tail_logps != 0).any() and (out.tail_logps == 0).any()
    chosen, rejected = F.split_pairs(out.sequence, 4)
    assert torch.equal(chosen.logps, out.sequence.logps[:4])
    assert torch.equal(rejected.num_tokens, out.sequence.num_tokens[4:])


@pytest.mark.parametrize("packed", [False, True, "dense"], ids=["padded", "packed",
                                                                  "packed-dense-mask"])
def test_engine_gradients_equal_plain(tiny_model, tokenizer, pairs, packed):
    batch = collate(pairs, [1, 2, 5], tokenizer, bool(packed))
    weights = torch.linspace(-1.0, 2.0, batch.num_sequences)
    with A.dense_attention() if packed == "dense" else contextlib.nullcontext():
        (F.sequence_logps_from_model(tiny_model, batch).logps * weights).sum().backward()
    if packed is True:  # the segment path ran (and the dense one did not)
        assert batch.attention_plan.calls == tiny_model.config.num_hidden_layers
    elif packed == "dense":
        assert batch.attention_plan.calls == 0
    engine_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    reference = copy.deepcopy(tiny_model)
    plain = []
    for s in range(batch.num_sequences):
        where = batch.sequence_ids == s
        labels = batch.labels[where]
        logits = reference(input_ids=batch.input_ids[where][None]).logits[0]
        scored = labels != -100
        plain.append(logits.log_softmax(-1)[scored].gather(-1, labels[scored][:, None]).sum())
    (torch.stack(plain) * weights).sum().backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(engine_grads[name], param.grad, atol=1e-4, rtol=1e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert engine_grads["lm_head.weight"].abs().sum() > 0


@pytest.mark.parametrize("attention", ["segments", "dense"])
def test_packed_and_padded_agree_and_attention_stays_inside_sequences(tiny_model, tokenizer,
                                                                       pairs, attention):
    """Packed rows through segment attention (per-sequence SDPA) and through the dense fallback
    (transformers' block-diagonal mask from the position ids)."""
    indices = [0, 1, 2, 3, 4, 5, 6, 7]
    dense = attention == "dense"
    with torch.no_grad(), (A.dense_attention() if dense else contextlib.nullcontext()):
        padded = F.sequence_logps_from_model(tiny_model, collate(pairs, indices, tokenizer, False))
        packed_batch = collate(pairs, indices, tokenizer, True)
        packed = F.sequence_logps_from_model(tiny_model, packed_batch)
        runs = tiny_model.config.num_hidden_layers
        assert packed_batch.attention_plan.calls == (0 if dense else runs)
        close(packed.logps, padded.logps)
        assert torch.equal(packed.num_tokens, padded.num_tokens)

        # change the first sequence's tokens: in a packed row nothing else may move
        edited = dataclasses.replace(packed_batch, input_ids=packed_batch.input_ids.clone())
        first = (packed_batch.sequence_ids == 0).nonzero(as_tuple=True)[1]
        edited.input_ids[0, first[:-1]] = (edited.input_ids[0, first[:-1]] + 17) % len(tokenizer)
        after = F.sequence_logps_from_model(tiny_model, edited)
        assert torch.equal(after.logps[1:], packed.logps[1:])
        assert (after.logps[0] - packed.logps[0]).abs() > 1e-3

        # control: one continuous position range (a single segment) does leak, and it shows
        leaky = dataclasses.replace(edited, attention_plan=None,
                                    position_ids=torch.arange(edited.input_ids.shape[1])[None])
        leaked = F.sequence_logps_from_model(tiny_model, leaky)
        assert (leaked.logps[1:] - after.logps[1:]).abs().max() > 0.1


def test_varlen_attention_gets_cu_seqlens(tiny_model, tokenizer, pairs, monkeypatch):
    """The flash-attention path's contract, with a plain-torch varlen attention standing in for
    flash-attn (not installable without CUDA): packed rows reach the attention with no mask and
    ``cu_seq_lens_q/k`` + ``max_length_q/k`` from the batch, and attending per segment gives the
    padded batch's logps."""
    from transformers import AttentionInterface

    seen = []

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        cu, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        seen.append((attention_mask, cu, cu_k, kwargs["max_length_q"], kwargs["max_length_k"]))
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling)
            for a, b in itertools.pairwise(cu.tolist())], dim=2)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("fastpo_varlen_test", varlen_attention)
    monkeypatch.setattr(F, "uses_varlen_attention", lambda impl: impl == "fastpo_varlen_test")
    batch = collate(pairs, [0, 3, 6], tokenizer, True, pad_to_multiple_of=32)
    padded = F.sequence_logps_from_model(tiny_model, collate(pairs, [0, 3, 6], tokenizer, False))
    tiny_model.config._attn_implementation = "fastpo_varlen_test"
    got = F.sequence_logps_from_model(tiny_model, batch)
    assert len(seen) == tiny_model.config.num_hidden_layers
    mask, cu, cu_k, max_q, max_k = seen[0]
    assert mask is None and cu is cu_k and torch.equal(cu, batch.cu_seqlens)
    assert max_q == max_k == batch.max_seqlen and isinstance(max_q, int)
    close(got.logps, padded.logps)


def test_which_attention_gets_cu_seqlens():
    assert F.uses_varlen_attention("flash_attention_2")
    assert F.uses_varlen_attention("kernels-community/flash-attn2")
    assert not any(map(F.uses_varlen_attention, ["sdpa", "eager", "flex_attention", None]))


def test_head_sees_only_scored_positions_and_lm_head_never_runs(tiny_model, tokenizer, pairs,
                                                                monkeypatch):
    batch = collate(pairs, [0, 1], tokenizer, False)
    calls = []
    tiny_model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    seen = []
    for module, name in ((F, "linear_token_logps"), (kernels, "token_logps")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _op=op, _name=name, **k: seen.append(
            (_name, a[0].shape[0])) or _op(*a, **k))
    F.sequence_logps_from_model(tiny_model, batch)
    F.sequence_logps_from_model(tiny_model, batch, use_fused_linear=False)
    assert calls == []
    scored = int((batch.labels != -100).sum())
    assert seen == [("linear_token_logps", scored), ("token_logps", scored)]
    assert scored == int(batch.completion_tokens.sum()) < batch.input_ids.numel()


def test_tied_embeddings(tiny_config, tokenizer, pairs):
    from transformers import LlamaForCausalLM

    tiny_config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = collate(pairs, [2, 6], tokenizer, True)
    out = F.sequence_logps_from_model(model, batch)
    close(out.logps, plain_logps(model, batch)["logps"])
    out.logps.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "phi", "gemma2", "cohere", "granite"])
def test_other_architectures(arch):
    """GPT-2 (tied wte), Qwen2, Phi (lm_head bias), Gemma2 (final logit soft-capping), Cohere
    (logit scale) and Granite (logits divided by ``logits_scaling``), the transforms in the fused
    op too, through the engine, padded and packed, fused and from logits, against their own full
    forward (logps and the logits sums)."""
    from transformers import (
        AutoModelForCausalLM,
        CohereConfig,
        Gemma2Config,
        GPT2Config,
        GraniteConfig,
        PhiConfig,
        Qwen2Config,
    )

    small = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4}
    config = {"gpt2": lambda: GPT2Config(vocab_size=1000, n_embd=32, n_layer=2, n_head=2),
              "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **small),
              "phi": lambda: PhiConfig(**small),
              "gemma2": lambda: Gemma2Config(num_key_value_heads=2, head_dim=8,
                                             final_logit_softcapping=1.0, initializer_range=0.3,
                                             **small),
              "cohere": lambda: CohereConfig(num_key_value_heads=2, logit_scale=0.37,
                                             **small),
              "granite": lambda: GraniteConfig(num_key_value_heads=2, logits_scaling=3.0,
                                               **small)}[arch]()
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    pairs = [data.TokenizedPair([1, 2, 3], [4, 5, 6, 7], [8, 9]),
             data.TokenizedPair([10, 11], [12], [13, 14, 15])]
    for packed in (False, True):
        batch = B.collate_pairs(pairs, pad_token_id=0, padding_free=packed)
        plain = plain_logps(model, batch)
        for fused in (True, False):
            out = F.sequence_logps_from_model(model, batch, use_fused_linear=fused,
                                              with_logits_sum=True)
            close(out.logps, plain["logps"])
            close(out.logits_sum, plain["logits_sum"])


# ------------------------------------------------------------------------------- references
def test_frozen_and_no_reference(tiny_model, tokenizer, pairs):
    batch = collate(pairs, [0, 5], tokenizer, False)
    expected = F.sequence_logps_from_model(tiny_model, batch).logps.detach()
    ref = R.FrozenReference(copy.deepcopy(tiny_model), device="cpu")
    out = ref.sequence_logps(batch)
    assert not out.logps.requires_grad and not ref.model.training
    assert not any(p.requires_grad for p in ref.model.parameters())
    torch.testing.assert_close(out.logps, expected)
    with_tail = ref.reference_logps(batch, with_tail_logps=True)
    close(with_tail.tail_logps, plain_logps(tiny_model, batch)["tail"])
    none = R.NoReference().reference_logps(batch, with_tail_logps=True)
    assert torch.equal(none.sequence.logps, torch.zeros(4))
    assert torch.equal(none.tail_logps, torch.zeros(4))
    assert torch.equal(none.sequence.num_tokens, batch.completion_tokens)


def test_adapter_disabled_reference_is_the_base_model(tiny_model, tokenizer, pairs):
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_model)
    policy = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                   target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    policy.train()
    batch = collate(pairs, [1, 4, 6], tokenizer, True)
    ref = R.AdapterDisabledReference(policy).sequence_logps(batch)
    base_logps = F.sequence_logps_from_model(base.eval(), batch).logps.detach()
    torch.testing.assert_close(ref.logps, base_logps)
    assert not ref.logps.requires_grad
    assert policy.training and all(m.training for m in policy.modules())  # modes restored
    policy.eval()
    adapted = F.sequence_logps_from_model(policy, batch).logps
    assert (adapted - base_logps).abs().max() > 1e-2  # the adapter is back on
    with pytest.raises(TypeError, match="needs a PEFT model"):
        R.AdapterDisabledReference(base)


def test_precomputed_cache_reused_and_rejected_when_stale(tiny_model, tokenizer, pairs, tmp_path,
                                                          monkeypatch):
    path = tmp_path / "ref" / "logps.safetensors"
    reference = R.FrozenReference(copy.deepcopy(tiny_model))
    key = RC.reference_cache_key(reference.model, pairs)
    cached = RC.precompute_reference_logps(reference, pairs, path, key=key,
                                          pad_token_id=tokenizer.pad_token_id, pairs_per_batch=3)
    assert path.is_file() and len(cached) == len(pairs)
    for indices, packed in (([5, 0, 3], False), ([7, 2], True)):
        batch = collate(pairs, indices, tokenizer, packed)
        live = reference.reference_logps(batch, with_tail_logps=True)
        got = cached.reference_logps(batch, with_tail_logps=True)
        close(got.sequence.logps, live.sequence.logps)
        close(got.tail_logps, live.tail_logps)

    # reused: no forward runs the second time (the key is computed from the same weights/data)
    def no_forward(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(R, "forward_logps", no_forward)
    again = RC.precompute_reference_logps(reference, pairs, path,
                                         pad_token_id=tokenizer.pad_token_id)
    assert again.key == key
    monkeypatch.undo()

    # stale: other weights, other data, other tokenization settings
    changed = copy.deepcopy(reference.model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    other_data = pairs.subset(range(7))
    other_settings = copy.copy(pairs)
    other_settings.settings = dict(pairs.settings, max_length=47)
    for model, dataset in ((changed, pairs), (reference.model, other_data),
                           (reference.model, other_settings)):
        stale = RC.reference_cache_key(model, dataset)
        assert stale != key
        with pytest.raises(ValueError, match="stale"):
            RC.CachedReference(path, key=stale)
        with pytest.raises(ValueError, match="stale"):
            RC.precompute_reference_logps(R.FrozenReference(model), dataset, path, key=stale,
                                         pad_token_id=tokenizer.pad_token_id)
    fresh = RC.precompute_reference_logps(R.FrozenReference(changed), pairs, path,
                                         pad_token_id=tokenizer.pad_token_id, overwrite=True)
    assert fresh.key == RC.reference_cache_key(changed, pairs)
    assert sorted(p.name for p in path.parent.iterdir()) == ["logps.safetensors",
                                                             "logps.safetensors.lock"]
    with pytest.raises(ValueError, match=r"need batch\.indices"):
        fresh.sequence_logps(B.collate_pairs(pairs.pairs[:1], pad_token_id=0))


def test_unpaired_cache_with_kl(tiny_model, tokenizer, pairs, tmp_path):
    examples = data.TokenizedDataset([], [data.TokenizedExample(p.prompt_ids, c, k % 2 == 0)
                                          for k, p in enumerate(pairs.pairs)
                                          for c in (p.chosen_ids, p.rejected_ids)],
                                     data.DataStats(), {"unpaired": True})
    reference = R.FrozenReference(tiny_model)
    cached = RC.precompute_reference_logps(reference, examples, tmp_path / "kto.safetensors",
                                          pad_token_id=tokenizer.pad_token_id, pairs_per_batch=5)
    batch = collate(examples, [9, 2, 14], tokenizer, True)
    assert batch.num_kl_sequences == 3
    close(cached.sequence_logps(batch).logps, reference.sequence_logps(batch).logps)
    in_batch_kl = B.collate_unpaired([examples[9], examples[2]], pad_token_id=0, indices=[9, 2])
    with pytest.raises(ValueError, match="dataset-level KL partners"):
        cached.sequence_logps(in_batch_kl)


def test_weights_hash_ignores_adapters(tiny_model):
    from peft import LoraConfig, get_peft_model

    before = RC.weights_hash(tiny_model)
    policy = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert RC.weights_hash(policy) == before


def test_forward_errors(tiny_model, tokenizer, pairs):
    batch = collate(pairs, [0], tokenizer, False)
    with pytest.raises(TypeError, match="batch must be a PreferenceBatch"):
        F.sequence_logps_from_model(tiny_model, {"input_ids": batch.input_ids})
    with pytest.raises(TypeError, match="has no output embeddings with a weight"):
        F.sequence_logps_from_model(tiny_model.model, batch)
    out = F.sequence_logps_from_model(tiny_model, batch)
    with pytest.raises(ValueError, match="2 sequences cannot be split into 2"):
        F.split_pairs(out, 2)
    examples = [data.TokenizedExample([1, 2], [3], True)]
    unpaired = B.collate_unpaired(examples, pad_token_id=0, with_kl=False)
    with pytest.raises(ValueError, match="tail logps need a pair batch"):
        F.forward_logps(tiny_model, unpaired, with_tail_logps=True)
    got, kl = F.split_unpaired(F.sequence_logps_from_model(tiny_model, unpaired), 1)
    assert kl is None and got.logps.shape == (1,)
