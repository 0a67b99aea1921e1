"""Every loss type and KTO through the engine: LoRA policy, adapter-off reference, packed rows,
the loss's gradient reaching every adapter weight (small vocabulary, random token ids)."""

from __future__ import annotations

import torch

from fastpo.engine.data import batch as B
from fastpo.engine.data import dataset as data
from fastpo.engine.model import forward as F
from fastpo.engine.model import reference as R

SMALL_VOCAB = 1000  # the loss wiring does not need the 49k vocabulary: keep these tests quick


def lora_policy(vocab_size: int = SMALL_VOCAB):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from fastpo.engine.data.assets import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, initializer_range=0.1))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))


def random_ids(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, SMALL_VOCAB, (n,), generator=generator).tolist()


def check_gradients(policy, loss: torch.Tensor, what: str) -> None:
    assert loss.dim() == 0 and torch.isfinite(loss), what
    policy.zero_grad()
    loss.backward()
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), (what, name)
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0, what


def test_every_loss_type_through_the_engine():
    from fastpo.engine import losses

    g = torch.Generator().manual_seed(0)
    pairs = [data.TokenizedPair(random_ids(g, p), random_ids(g, c), random_ids(g, r))
             for p, c, r in ((5, 9, 4), (12, 3, 7), (3, 6, 6))]
    policy = lora_policy()
    reference = R.AdapterDisabledReference(policy)
    batch = B.collate_pairs(pairs, pad_token_id=0, padding_free=True)
    ref = reference.reference_logps(batch, with_tail_logps=True)
    ref_c, ref_r = F.split_pairs(ref.sequence, batch.num_pairs)
    ref_tail_c, ref_tail_r = ref.tail_logps.split(batch.num_pairs)

    def policy_pass():
        out = F.forward_logps(policy, batch, with_logits_sum=True, with_tail_logps=True,
                              with_log_sum_sq_probs=True)
        c, r = F.split_pairs(out.sequence, batch.num_pairs)
        extras = {"chosen_num_tokens": c.num_tokens, "rejected_num_tokens": r.num_tokens,
                  "chosen_logits_sum": c.logits_sum, "rejected_logits_sum": r.logits_sum,
                  "vocab_size": SMALL_VOCAB}
        return out, c, r, extras

    for loss_type in losses.LOSS_TYPES:
        _, c, r, extras = policy_pass()
        smoothing = 1e-3 if loss_type == "exo_pair" else 0.0  # exo_pair needs some
        out = losses.preference_loss(c.logps, r.logps, ref_c.logps, ref_r.logps,
                                     loss_type=loss_type, label_smoothing=smoothing, **extras)
        assert all(torch.isfinite(v).all() for v in out.metrics.values()), loss_type
        check_gradients(policy, out.loss, loss_type)

    out, c, r, extras = policy_pass()
    tail_c, tail_r = out.tail_logps.split(batch.num_pairs)
    sum_sq_c, sum_sq_r = out.log_sum_sq_probs.split(batch.num_pairs)
    combined = losses.preference_loss(
        c.logps, r.logps, ref_c.logps, ref_r.logps, loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.5, policy_chosen_tail_logps=tail_c,
        policy_rejected_tail_logps=tail_r, ref_chosen_tail_logps=ref_tail_c,
        ref_rejected_tail_logps=ref_tail_r, use_weighting=True, chosen_log_sum_sq_probs=sum_sq_c,
        rejected_log_sum_sq_probs=sum_sq_r, **extras)
    check_gradients(policy, combined.loss, "MPO + LD-DPO + WPO")

    # reference-free: NoReference's zeros are TRL's reference_free convention
    zero_c, zero_r = F.split_pairs(R.NoReference().sequence_logps(batch), batch.num_pairs)
    _, c, r, extras = policy_pass()
    free = losses.preference_loss(c.logps, r.logps, loss_type="ipo", reference_free=True,
                                  **extras)
    zeros = losses.preference_loss(c.logps, r.logps, zero_c.logps, zero_r.logps,
                                   loss_type="ipo", **extras)
    torch.testing.assert_close(free.loss, zeros.loss)
    check_gradients(policy, free.loss, "reference-free ipo")
    for loss_type in losses.CPO_LOSS_TYPES:
        _, c, r, extras = policy_pass()
        check_gradients(policy, losses.cpo_loss(c.logps, r.logps, loss_type=loss_type,
                                                **extras).loss, f"cpo {loss_type}")
    _, c, r, extras = policy_pass()
    check_gradients(policy, losses.orpo_loss(c.logps, r.logps, **extras).loss, "orpo")


def test_kto_through_the_engine():
    from fastpo.engine import losses

    g = torch.Generator().manual_seed(1)
    examples = data.TokenizedDataset([], [
        data.TokenizedExample(random_ids(g, 3 + i % 4), random_ids(g, 2 + i % 5), i % 2 == 0)
        for i in range(10)], data.DataStats(), {})
    policy = lora_policy()
    reference = R.AdapterDisabledReference(policy)
    batch = B.collate_batch(examples, [0, 3, 4, 9], pad_token_id=0, padding_free=True)
    assert batch.desirable.tolist() == [True, False, True, False]
    ref, ref_kl = F.split_unpaired(reference.sequence_logps(batch), batch.num_examples)
    for loss_type in losses.KTO_LOSS_TYPES:
        out = F.sequence_logps_from_model(policy, batch, with_logits_sum=True)
        pol, pol_kl = F.split_unpaired(out, batch.num_examples)
        result = losses.kto_loss(pol.logps, ref.logps, batch.desirable, loss_type=loss_type,
                                 policy_kl_logps=pol_kl.logps, ref_kl_logps=ref_kl.logps,
                                 num_tokens=pol.num_tokens, logits_sum=pol.logits_sum,
                                 vocab_size=SMALL_VOCAB)
        check_gradients(policy, result.loss, f"kto {loss_type}")
