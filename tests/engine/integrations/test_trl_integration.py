"""fastpo inside TRL's trainers: same losses, metrics and gradients as TRL's own fused head.

Each comparison builds two trainers on identical copies of a tiny random Llama (hidden 64,
2 layers, the 49152-token vocabulary of the SmolLM2 tokenizer from conftest's ``tokenizer``
fixture): one as TRL ships it, one with ``patch_trainer``. TRL's chunked log-prob function is
made to fail in the patched run, so a pass proves fastpo's ops computed every log-probability.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration is tested with TRL installed")
datasets = pytest.importorskip("datasets")

from fastpo.engine.data.assets import tiny_llama_config  # noqa: E402
from fastpo.engine.integrations import trl as fastpo_trl  # noqa: E402
from fastpo.engine.integrations import trl_head  # noqa: E402
from fastpo.engine.integrations.head_statistics import (  # noqa: E402
    STATISTICS,
    head_statistics,
)

STEPS = 3
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen",
           "logits/rejected", "entropy", "mean_token_accuracy")
KTO_METRICS = ("loss", "grad_norm", "kl", "entropy")  # rewards/* etc. when the batch has both


@pytest.fixture(scope="module")
def base_model(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    # a non-trivial head bias would be skipped by Llama; scale the head so logps vary per token
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


PAIRS = [
    ("What is the capital of France?", " Paris is the capital.", " I think it is Rome, maybe."),
    ("Name a prime number.", " Seven.", " Nine is prime."),
    ("Translate 'cat' to German.", " Katze.", " Hund, I believe."),
    ("2 + 2 =", " 4", " 5, obviously"),
    ("Spell 'dog' backwards.", " god", " gdo"),
    ("Which planet is red?", " Mars.", " Venus is the red one."),
]


def _preference_dataset():
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    return datasets.Dataset.from_list(rows)


def _unpaired_dataset():
    rows = []
    for p, c, r in PAIRS:
        rows.append({"prompt": p, "completion": c, "label": True})
        rows.append({"prompt": p, "completion": r, "label": False})
    return datasets.Dataset.from_list(rows)


def _common_args(tmp_path, name: str) -> dict:
    return dict(output_dir=str(tmp_path / name), max_steps=STEPS, logging_steps=1, bf16=False,
                report_to="none", save_strategy="no", use_cpu=True, optim="sgd",
                learning_rate=1.0, seed=0, max_length=48, disable_tqdm=True,
                dataloader_num_workers=0, lr_scheduler_type="constant")


def _dpo_trainer(base_model, tokenizer, tmp_path, name: str, **config):
    args = trl.DPOConfig(**{**_common_args(tmp_path, name), **config},
                         per_device_train_batch_size=2)
    return trl.DPOTrainer(model=copy.deepcopy(base_model), ref_model=copy.deepcopy(base_model),
                          args=args, train_dataset=_preference_dataset(),
                          processing_class=tokenizer)


def _kto_trainer(base_model, tokenizer, tmp_path, name: str, **config):
    args = trl.KTOConfig(**_common_args(tmp_path, name), per_device_train_batch_size=4,
                         **config)
    return trl.KTOTrainer(model=copy.deepcopy(base_model), ref_model=copy.deepcopy(base_model),
                          args=args, train_dataset=_unpaired_dataset(),
                          processing_class=tokenizer)


@pytest.fixture
def trl_head_forbidden(monkeypatch):
    """Make TRL's own chunked log-prob function fail while active."""
    import trl.trainer.utils as trl_utils

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's chunked log-prob function ran in a fastpo-patched trainer")

    class Forbidden:
        apply = staticmethod(refuse)

    def forbid():
        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Forbidden)

    return forbid


def _train(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _assert_logs_match(stock: list[dict], fast: list[dict], required) -> None:
    """Every logged value of every step agrees; the ``required`` metrics are among them."""
    assert len(stock) == len(fast) == STEPS
    for step, (a, b) in enumerate(zip(stock, fast), 1):
        assert set(required) <= set(a), f"step {step}: missing {set(required) - set(a)}"
        assert a.keys() == b.keys(), f"step {step}: {sorted(a.keys() ^ b.keys())}"
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=2e-5), (
                f"step {step}: {key} TRL {a[key]} vs fastpo {b[key]}")


def _assert_params_match(model_a, model_b) -> None:
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("fused_linear", "config", "path"),
    [
        (None, {}, "linear"),
        (False, {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5],
                 "use_weighting": True}, "logits"),
    ],
    ids=["sigmoid-fused-linear", "sigmoid+ipo-wpo-from-logits"],
)
def test_dpo_trainer_three_steps_match(base_model, tokenizer, tmp_path, trl_head_forbidden,
                                       fused_linear, config, path):
    stock = _dpo_trainer(base_model, tokenizer, tmp_path, "stock", **config)
    stock_logs = _train(stock)

    fast = fastpo_trl.patch_trainer(
        _dpo_trainer(base_model, tokenizer, tmp_path, "fast", **config), fused_linear=fused_linear)
    trl_head_forbidden()
    fast_logs = _train(fast)

    _assert_logs_match(stock_logs, fast_logs, METRICS)
    _assert_params_match(stock.model, fast.model)
    counts = fastpo_trl.path_counts(fast)
    assert counts["policy"].get(path, 0) == STEPS and set(counts["policy"]) == {path}
    assert counts["reference"].get(path, 0) == STEPS


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_dpo_gradients_match(base_model, tokenizer, tmp_path, trl_head_forbidden, bf16):
    """One batch through ``compute_loss`` + backward. ``bf16=True`` is TRL's default on CPU:
    autocast, and a reference model whose forward accelerate wrapped before the patch."""
    stock = _dpo_trainer(base_model, tokenizer, tmp_path, "stock", bf16=bf16)
    fast = fastpo_trl.patch_trainer(
        _dpo_trainer(base_model, tokenizer, tmp_path, "fast", bf16=bf16))
    assert ("_original_forward" in fast.ref_model.__dict__) == bf16
    batch = next(iter(stock.get_train_dataloader()))
    assert int((batch["completion_mask"] == 0).sum()) > 0  # prompt/padding really are masked

    grads = []
    for trainer in (stock, fast):
        if trainer is fast:
            trl_head_forbidden()
        trainer.model.train()
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in
                                      trainer.model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    # bf16: TRL rounds each logit tile to bf16, fastpo accumulates the bf16 products in fp32
    tol = 2e-3 if bf16 else 2e-5
    torch.testing.assert_close(loss_b, loss_a, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys() and "lm_head.weight" in grads_a
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grads_b[name] / scale, grads_a[name] / scale,
                                   rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    counts = fastpo_trl.path_counts(fast)
    assert counts == {"policy": {"linear": 1}, "reference": {"linear": 1}}


def test_dpo_lora_without_reference_model(base_model, tokenizer, tmp_path, trl_head_forbidden):
    """PEFT: TRL's reference is the policy with its adapter disabled; both calls go to fastpo."""
    peft = pytest.importorskip("peft")
    results = []
    for name in ("stock", "fast"):
        args = trl.DPOConfig(**_common_args(tmp_path, name), per_device_train_batch_size=2)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               lora_dropout=0.0)
        trainer = trl.DPOTrainer(model=copy.deepcopy(base_model), args=args,
                                 train_dataset=_preference_dataset(), processing_class=tokenizer,
                                 peft_config=lora)
        assert trainer.ref_model is None
        if name == "fast":
            fastpo_trl.patch_trainer(trainer)
            trl_head_forbidden()
        # non-zero LoRA B so that policy and reference differ
        torch.manual_seed(1)
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        batch = next(iter(trainer.get_train_dataloader()))
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                 if p.grad is not None}
        results.append((loss.detach(), grads, trainer))
    (loss_a, grads_a, _), (loss_b, grads_b, fast) = results
    assert grads_a and all("lora_" in n for n in grads_a) and grads_a.keys() == grads_b.keys()
    assert abs(float(loss_a) - 0.6931) > 1e-3  # the adapter makes policy != reference
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6)
    assert fastpo_trl.path_counts(fast) == {"policy": {"linear": 2}}


def test_kto_trainer_three_steps_match(base_model, tokenizer, tmp_path, trl_head_forbidden):
    stock = _kto_trainer(base_model, tokenizer, tmp_path, "stock")
    stock_logs = _train(stock)
    fast = fastpo_trl.patch_trainer(_kto_trainer(base_model, tokenizer, tmp_path, "fast"))
    trl_head_forbidden()
    fast_logs = _train(fast)
    _assert_logs_match(stock_logs, fast_logs, KTO_METRICS)
    _assert_params_match(stock.model, fast.model)
    assert fastpo_trl.path_counts(fast)["policy"]["linear"] >= STEPS


def test_patch_is_idempotent_and_reversible(base_model, tokenizer, tmp_path):
    trainer = _dpo_trainer(base_model, tokenizer, tmp_path, "idem")
    trl_forward = trainer.model.forward
    fastpo_trl.patch_trainer(trainer)
    patched = trainer.model.forward
    fastpo_trl.patch_trainer(trainer)
    assert trainer.model.forward is patched and fastpo_trl.is_patched(trainer.model)
    fastpo_trl.unpatch_trainer(trainer)
    assert trainer.model.forward is trl_forward and not fastpo_trl.is_patched(trainer.model)


def test_bad_inputs(base_model, tokenizer, tmp_path):
    with pytest.raises(TypeError, match="supports DPOTrainer, KTOTrainer"):
        fastpo_trl.patch_trainer(object())
    with pytest.raises(ValueError, match="was not patched by TRL's add_fused_lm_head"):
        fastpo_trl.patch_model(copy.deepcopy(base_model))
    with pytest.raises(TypeError, match="fused_linear must be"):
        fastpo_trl.patch_model(copy.deepcopy(base_model), fused_linear="yes")
    with pytest.raises(ValueError, match="not patched by fastpo"):
        fastpo_trl.patch_state(base_model)
    trainer = _dpo_trainer(base_model, tokenizer, tmp_path, "bad")
    trainer.model.get_output_embeddings = lambda: torch.nn.Identity()
    with pytest.raises(ValueError, match=r"fused_linear=True but .*Identity"):
        fastpo_trl.patch_model(trainer.model, fused_linear=True)


def test_unsupported_heads_are_named_in_a_warning(base_model, tokenizer, tmp_path):
    """A head the fused op cannot take (here a non-Linear module, as a quantized head is): the
    patch says which path the model takes and why."""
    trainer = _dpo_trainer(base_model, tokenizer, tmp_path, "warn-head")
    trainer.model.get_output_embeddings = lambda: torch.nn.Identity()
    with pytest.warns(RuntimeWarning, match=r"Identity, not a plain torch.nn.Linear.*logits"):
        fastpo_trl.patch_model(trainer.model)


def test_head_statistics_against_float64():
    torch.manual_seed(0)
    z = torch.randn(37, 1003) * 3
    z[3, 10] = z[3, 20] = z[3].max() + 1.0  # a tie: the first maximum is the top-1
    labels = torch.randint(0, 1003, (37,))
    labels[3] = 20
    labels[4] = int(z[4].argmax())
    stats = head_statistics(lambda s, e: z[s:e], labels, vocab_size=1003, which=set(STATISTICS),
                            transform=lambda t: t / 0.7, chunk_elements=5000)
    x = z.double() / 0.7
    logp = x.log_softmax(-1)
    torch.testing.assert_close(stats["entropy"].double(), -(logp.exp() * logp).sum(-1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["mean_logits"].double(), x.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["log_sum_sq_probs"].double(),
                               torch.logsumexp(2 * logp, -1), rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["is_top1"], x.argmax(-1) == labels)
    assert not stats["is_top1"][3] and stats["is_top1"][4]


@pytest.mark.parametrize("softcap, logit_scale", [(3.0, 0.7), (None, 1.6), (1.5, 1.0)])
def test_softcapped_and_scaled_heads_keep_the_fused_path(softcap, logit_scale):
    """A Gemma-2 / Cohere style head (TRL's soft-cap and logit scale settings) takes the fused
    linear path, and its log-probs, gradients and statistics match the logits path."""
    settings = fastpo_trl.HeadSettings(
        temperature=0.8, logit_scale=logit_scale, softcap=softcap,
        outputs=frozenset({"log_probs", "entropy", "mean_logits", "is_top1"}))
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 53, bias=False)
    head.weight.data.mul_(4.0)
    assert trl_head.choose_path(head, settings, None) == ("linear", "")
    hidden = torch.randn(2, 7, 16)
    labels = torch.randint(0, 53, (2, 7))
    labels[:, :2] = -100
    mask = labels != -100
    results = []
    for path in (trl_head.linear_path, trl_head.logits_path):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        logps, stats = path(head, h, labels, mask, settings)
        logps.sum().backward()
        results.append((logps.detach(), h.grad, head.weight.grad.clone(), stats))
    (lp, gh, gw, st), (lp2, gh2, gw2, st2) = results
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, gh2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw2, rtol=1e-4, atol=1e-5)
    assert st.keys() == st2.keys() == {"entropy", "mean_logits", "is_top1"}
    for key in st:
        torch.testing.assert_close(st[key], st2[key], rtol=1e-5, atol=1e-5)
