"""The custom-loop recipe: completion log-probs from the body + head of any causal LM.

``completion_logps`` (fused linear op on the final hidden states, or the head module on the
scored positions) is compared with the plain path every user already trusts:
``model(...).logits`` -> float64 log-softmax -> gather. A DPO step of a custom loop (policy,
reference from a frozen copy or from the PEFT model with its adapter off) then gives the same loss,
gradients and updated weights as the same step on the logits path.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastpo import kernels
from fastpo.engine.data.assets import tiny_llama_config
from fastpo.engine.integrations import model_parts
from fastpo.engine.integrations.model_parts import completion_logps
from fastpo.engine.losses import preference_loss

VOCAB = 1003  # not a power of two
B, T = 3, 13  # 3 pairs -> 6 rows
LR = 0.5


def _llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, initializer_range=0.1)).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # logps that vary per token
    return model


def _batch():
    """2B rows (chosen then rejected), left prompts of varying length, right padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2 * B, T), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    prompt = [3, 5, 2, 4, 1, 6]
    length = [T, T - 2, T - 4, T, T - 1, T - 5]
    for row in range(2 * B):
        labels[row, : prompt[row]] = -100
        labels[row, length[row]:] = -100
        mask[row, length[row]:] = 0
    labels[2, :] = -100  # one row with nothing scored
    return ids, mask, labels


def _logits_path(model, ids, mask, labels):
    """The trusted path: full logits, float64 log-softmax, gather, sum over scored tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    target = labels[:, 1:]
    scored = target != -100
    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, logp, 0.0).sum(-1), scored.sum(-1)


def _only_path(monkeypatch, path: str) -> None:
    """Make the op of the other path fail, so a pass proves which path ran."""
    other = "token_logps" if path == "linear" else "linear_sequence_logps"

    def refuse(*args, **kwargs):
        raise AssertionError(f"{other} ran; expected the {path} path")

    monkeypatch.setattr(model_parts.kernels, other, refuse)


@pytest.mark.parametrize("fused_linear", [None, False], ids=["fused-linear", "from-logits"])
def test_logps_equal_the_logits_path(monkeypatch, fused_linear):
    model = _llama()
    ids, mask, labels = _batch()
    _only_path(monkeypatch, "linear" if fused_linear is None else "logits")
    out = completion_logps(model, labels, input_ids=ids, attention_mask=mask,
                           fused_linear=fused_linear)
    expected, counts = _logits_path(model, ids, mask, labels)
    assert out.logps.dtype == torch.float32 and out.logps.shape == (2 * B,)
    torch.testing.assert_close(out.logps.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.num_tokens.long(), counts) and int(counts[2]) == 0
    assert float(out.logps.detach()[2]) == 0.0


def test_body_and_head_are_found_without_model_model():
    model = _llama()
    assert model_parts.decoder_body(model) is model.model
    assert model_parts.lm_head(model) is model.lm_head
    ids, mask, _ = _batch()
    hidden = model_parts.final_hidden_states(model, input_ids=ids, attention_mask=mask)
    assert hidden.shape == (2 * B, T, 64)
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(model.lm_head(hidden), logits, rtol=1e-5, atol=1e-5)


def _dpo_step(model, ref_logps, ids, mask, labels, *, fastpo_path: bool):
    """One custom-loop DPO step; returns the loss (the gradients stay on the parameters)."""
    if fastpo_path:
        policy = completion_logps(model, labels, input_ids=ids, attention_mask=mask).logps
    else:
        policy = _logits_path(model, ids, mask, labels)[0].float()
    out = preference_loss(policy[:B], policy[B:], ref_logps[:B], ref_logps[B:], beta=0.5)
    out.loss.backward()
    return out.loss.detach()


def test_custom_loop_dpo_step_with_a_reference_copy():
    """Reference: a frozen copy of the starting model, evaluated under no_grad."""
    ids, mask, labels = _batch()
    results = []
    for fastpo_path in (True, False):
        model = _llama()
        torch.manual_seed(3)  # move the policy away from the reference
        with torch.no_grad():
            for p in model.model.layers[0].parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ref_model = _llama().eval()
        with torch.no_grad():
            ref = (completion_logps(ref_model, labels, input_ids=ids, attention_mask=mask).logps
                   if fastpo_path else _logits_path(ref_model, ids, mask, labels)[0].float())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss = _dpo_step(model, ref, ids, mask, labels, fastpo_path=fastpo_path)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        results.append((loss, ref, grads, copy.deepcopy(model.state_dict())))
    (loss_a, ref_a, grads_a, state_a), (loss_b, ref_b, grads_b, state_b) = results
    assert abs(float(loss_b) - 0.6931) > 1e-3  # policy != reference
    torch.testing.assert_close(ref_a, ref_b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for name in grads_b:
        scale = grads_b[name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grads_a[name] / scale, grads_b[name] / scale, rtol=0,
                                   atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # the step moved each weight by lr * grad: it agrees to lr times the gradient tolerance
    for name, grad in grads_b.items():
        atol = LR * 1e-4 * float(grad.abs().max().clamp(min=1e-12))
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(state_b["lm_head.weight"], _llama().lm_head.weight)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]],
                         ids=["lora-body", "lora-on-head"])
def test_peft_reference_is_the_adapter_switched_off(monkeypatch, targets):
    """PEFT: the body is found through the wrapper; a LoRA head runs as a module (its adapter
    counts); the reference is the same model under ``disable_adapter()``."""
    peft = pytest.importorskip("peft")
    _only_path(monkeypatch, "logits" if "lm_head" in targets else "linear")
    base = _llama()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    torch.manual_seed(2)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    ids, mask, labels = _batch()
    with torch.no_grad(), model.disable_adapter():
        ref = completion_logps(model, labels, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(ref.logps.double(), _logits_path(base, ids, mask, labels)[0],
                               rtol=1e-5, atol=1e-4)
    policy = completion_logps(model, labels, input_ids=ids, attention_mask=mask)
    expected = _logits_path(model, ids, mask, labels)[0]
    torch.testing.assert_close(policy.logps.double(), expected, rtol=1e-5, atol=1e-4)
    assert (policy.logps - ref.logps).abs().max() > 1e-2  # the adapter changes the logps
    preference_loss(policy.logps[:B], policy.logps[B:], ref.logps[:B], ref.logps[B:],
                    beta=0.1).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    if "lm_head" in targets:
        head = model_parts.lm_head(model)
        assert type(head) is not torch.nn.Linear
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in head.named_parameters() if "lora_" in n)
        with pytest.raises(ValueError, match="fused_linear=True but the head is a"):
            completion_logps(model, labels, input_ids=ids, attention_mask=mask,
                             fused_linear=True)


@pytest.mark.parametrize("fused_linear", [None, True, False])
def test_softcapped_model(fused_linear, monkeypatch):
    """Gemma-2 soft-caps its logits: the fused op (the default) and the logits path apply the
    same cap as the model, forward and gradient."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, final_logit_softcapping=2.0, initializer_range=0.2)
    model = Gemma2ForCausalLM(config).float()
    ids, mask, labels = _batch()
    calls = []
    real = kernels.linear_sequence_logps
    monkeypatch.setattr(kernels, "linear_sequence_logps",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    out = completion_logps(model, labels, input_ids=ids, attention_mask=mask,
                           fused_linear=fused_linear)
    assert len(calls) == (fused_linear is not False)
    if calls:
        assert calls[0]["softcap"] == 2.0 and calls[0]["logit_scale"] == 1.0
    head = model.get_output_embeddings().weight
    out.logps.sum().backward()
    ours = head.grad.clone()
    model.zero_grad()
    want = _logits_path(model, ids, mask, labels)[0]
    want.sum().backward()
    torch.testing.assert_close(out.logps.double(), want.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours, head.grad, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    model = _llama()
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match=r"labels of shape \(6, 12\) do not match"):
        completion_logps(model, labels[:, 1:], input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match=r"int64/int32 tensor, got torch\.float32"):
        completion_logps(model, labels.float(), input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError, match="fused_linear must be"):
        completion_logps(model, labels, input_ids=ids, fused_linear="yes")
    with pytest.raises(TypeError, match="Linear has no decoder body"):
        model_parts.final_hidden_states(torch.nn.Linear(3, 4), input_ids=ids)
    with pytest.raises(TypeError, match="takes the model inputs only"):
        model_parts.final_hidden_states(model, input_ids=ids, labels=labels)
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        model_parts.lm_head("model")
    peft = pytest.importorskip("peft")
    prompt_tuned = peft.get_peft_model(_llama(), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning PEFT adapter"):
        completion_logps(prompt_tuned, labels, input_ids=ids, attention_mask=mask)
