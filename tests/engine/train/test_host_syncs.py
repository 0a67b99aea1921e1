"""No host synchronization in the hot path: the ops and whole training steps, counted by
``SyncCounter`` (``tests/sync_counter.py``: what it sees, and what it cannot).

Documented counts (tiny Llama, separate reference model, plain PyTorch backend):
- an op call (forward + backward of ``token_logps``, ``sequence_logps``,
  ``linear_sequence_logps``): 0.
- a training step that is not a logging step: 0 from fastpo. transformers (5.24) adds scalar
  reads while it builds the attention mask of each model forward (``masking_utils``: two
  ``fast_all`` of a padding mask, or ``find_packed_sequence_indices`` once for packed rows), so
  up to 4 per micro-batch (policy + reference forward); they are attributed and bounded here,
  not ours to remove.
- a logging step: exactly 1 from fastpo, the read of the one packed metrics tensor
  (``StepMetrics.read_steps``); under several ranks it follows one ``all_gather``.
- online training: the step that generates a round synchronizes (sampling decides when to stop,
  the sampled ids and scores come to the host); the round's other steps: 0 from fastpo.
"""

from __future__ import annotations

import pytest
import torch
from sync_counter import SyncCounter
from trainer_helpers import isolated_launch, job

from fastpo import kernels
from fastpo.engine.train.config_loading import config_from_dict


def ours(hits):
    return [h for h in hits if h[1].startswith("fastpo/")]


# --------------------------------------------------------------------------- the counter
def test_the_counter_sees_each_kind_of_sync():
    t = torch.randn(5)
    cases = {"item": lambda: t[0].item(), "float": lambda: float(t.sum()),
             "bool": lambda: bool((t > 0).any()), "if": lambda: 1 if t.sum() > 0 else 0,
             "equal": lambda: torch.equal(t, t), "tolist": lambda: t.tolist(),
             "numpy": lambda: t.numpy(), "cpu": lambda: t.cpu()}
    for name, fn in cases.items():
        with SyncCounter() as counter:
            fn()
        assert len(counter.hits) == 1, (name, counter.hits)
    with SyncCounter(data_dependent=True) as counter:
        t[t > 0].sum()
        (t > 0).nonzero()
    assert len(counter.hits) == 2
    with SyncCounter() as counter:  # no sync: device-side math, a device-side assert
        torch._assert_async((t.abs() >= 0).all())
        torch.where(torch.isfinite(t), t, 0.0).sum()
    assert counter.hits == []
    assert torch.Tensor.tolist.__name__ == "tolist"  # the wrappers are gone again


# ------------------------------------------------------------------------------ the ops
def _op_calls():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 37, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 37, (2, 7))
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    hidden = torch.randn(14, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    seq = torch.tensor([0] * 7 + [1] * 7)

    def run():
        out = kernels.sequence_logps(logits, labels, with_logits_sum=True)
        (out.logps.sum() + out.logits_sum.sum()).backward()
        kernels.token_logps(logits, labels).sum().backward()
        lin = kernels.linear_sequence_logps(hidden, weight, labels.reshape(-1),
                                            sequence_ids=seq, num_sequences=2)
        lin.logps.sum().backward()

    return run


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
def test_op_calls_do_not_synchronize(backend):
    """Forward + backward of the three public ops, label and sequence-id checks on: no scalar
    read, no copy to the host, on every backend (``triton`` through the interpreter runs the
    kernels CUDA tensors run).

    Output-size ops (``nonzero``) are not asserted here: the ops' CPU branches select the scored
    rows with ``nonzero`` by design (free on a CPU), and the CUDA branches that replace them
    (``device.type == "cuda"``) cannot run without a GPU."""
    run = _op_calls()
    with kernels.use_cpu_backend(backend):
        run()  # compile / warm up outside the count
        with SyncCounter() as counter:
            run()
    assert counter.hits == [], counter.hits
    assert "aten._assert_async" in counter.ops  # the value checks ran, queued on the device


# ------------------------------------------------------------------------- training steps
def _trainer(tiny_dir, pairs_file, tmp_path, **sections):
    from fastpo.engine.train import Trainer

    base = dict(optimization={"max_steps": 3, "gradient_accumulation_steps": 2},
                logging={"log_every": 2}, deepspeed={"enabled": False})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return Trainer(config_from_dict(job(tiny_dir, pairs_file, tmp_path, **base)))


def _third_party_bounded(hits, micro_batches: int) -> None:
    others = [h for h in hits if not h[1].startswith("fastpo/")]
    assert all(origin.startswith("transformers/masking_utils.py") for _, origin in others), \
        others
    assert len(others) <= 4 * micro_batches, others  # 2 model forwards, <= 2 reads each


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_training_steps_synchronize_only_at_logging_points(tiny_dir, pairs_file, tmp_path,
                                                          padding_free):
    trainer = _trainer(tiny_dir, pairs_file, tmp_path, data={"padding_free": padding_free})
    with SyncCounter() as first:  # step 1: forward, loss, backward, optimizer step
        record = trainer.train_step()
    assert not trainer._logging_step() and "loss" not in record
    assert ours(first.hits) == [], ours(first.hits)
    _third_party_bounded(first.hits, micro_batches=2)

    with SyncCounter() as second:  # step 2: a logging step, as the run loop does it
        trainer.train_step()
        assert trainer._logging_step()
        trainer.read_metrics()
    assert [what for what, _ in ours(second.hits)] == ["Tensor.tolist"], ours(second.hits)
    assert "train/metrics_log.py" in ours(second.hits)[0][1]
    _third_party_bounded(second.hits, micro_batches=2)
    # the read completed the records of both steps
    assert trainer._unread == [] and [r["step"] for r in trainer.history] == []
    assert record["tokens"] > 0 and not record["skipped"] and record["grad_norm"] > 0
    assert record["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 1


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_at_the_read(
        tiny_dir, pairs_file, tmp_path):
    """A NaN loss in step 1: nothing is read during the step, the update is skipped on the
    device (fused AdamW's found_inf), and ``stop`` raises at the next read, naming step 1."""
    from fastpo.engine.train import NonFiniteError

    trainer = _trainer(tiny_dir, pairs_file, tmp_path)
    objective = trainer.objective

    def poisoned(*args, **kwargs):
        out = objective(*args, **kwargs)
        if trainer.pos.step == 0:
            out.loss = out.loss * float("nan")
        return out

    poisoned.with_tails, poisoned.with_sum_sq = objective.with_tails, objective.with_sum_sq
    trainer.objective = poisoned
    before = {n: p.detach().clone() for n, p in trainer.backend.module.named_parameters()}
    with SyncCounter() as counter:
        trainer.train_step()
    assert ours(counter.hits) == []
    after = dict(trainer.backend.module.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # the update was skipped
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 1 \(2 micro-batch"):
        trainer.read_metrics()


@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan-loss"])
def test_deepspeed_fp32_zero0_steps_skip_a_non_finite_step_on_the_device(
        tiny_dir, pairs_file, tmp_path, poisoned):
    """DeepSpeed without ZeRO in fp32 has no overflow check of its own: the generated config's
    fused AdamW skips a non-finite step through ``found_inf`` (the gradient norm was read on
    the host before): a step adds no synchronization of ours, a NaN loss leaves the parameters
    and the optimizer state as they were, and a finite step is applied."""
    from fastpo.engine.train import NonFiniteError

    with isolated_launch():
        trainer = _trainer(tiny_dir, pairs_file, tmp_path,
                           deepspeed={"enabled": True, "zero_stage": 0})
        backend = trainer.backend
        assert backend.skip_on_device and not backend.precheck
        if poisoned:
            objective = trainer.objective

            def poison(*args, **kwargs):
                out = objective(*args, **kwargs)
                out.loss = out.loss * float("nan")
                return out

            poison.with_tails, poison.with_sum_sq = objective.with_tails, objective.with_sum_sq
            trainer.objective = poison
        params = dict(backend.module.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items()}
        with SyncCounter() as counter:
            first = trainer.train_step()
        assert ours(counter.hits) == [], ours(counter.hits)
        changed = [n for n in before if not torch.equal(before[n], params[n])]
        state = backend.engine.optimizer.state
        if poisoned:
            assert changed == []
            assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in state.values())
            with pytest.raises(NonFiniteError, match="non-finite loss at step 1"):
                trainer.read_metrics()
        else:
            assert changed and all(float(s["step"]) == 1 for s in state.values())
            second = trainer.train_step()
            trainer.read_metrics()
            assert not first["skipped"] and not second["skipped"] and first["grad_norm"] > 0


# ------------------------------------------------------- the fused linear op's gemm design
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("hint", [False, True], ids=["every-row", "num_scored"])
def test_gemm_design_op_calls_do_not_synchronize(backend, hint):
    """``design="gemm"`` forward + backward of the fused linear op: no host synchronization, not
    even for an output size (``data_dependent``), whether every row is computed (the default)
    or the scored rows are compacted from the caller's host-known count (``nonzero_static``,
    whose size is the host's; the count is checked with ``_assert_async``)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 37, (2, 7))
    labels[0, :3] = -100
    labels[1, 5:] = -100

    def run():
        out = kernels.linear_sequence_logps(hidden, weight, labels, design="gemm",
                                            num_scored=9 if hint else None, chunk_tokens=4,
                                            chunk_vocab=16)
        out.logps.sum().backward()

    with kernels.use_cpu_backend(backend):
        run()
        with SyncCounter(data_dependent=True) as counter:
            run()
    assert counter.hits == [], counter.hits
    assert "aten._assert_async" in counter.ops
    assert ("aten.nonzero_static" in counter.ops) == hint
    assert "aten.nonzero" not in counter.ops


# --------------------------------------------------------------------------- online steps
def test_online_steps_after_the_generating_one_do_not_synchronize(tiny_dir, tmp_path):
    """Online training: the step that generates a round waits for the host (sampling decides
    when to stop and the sampled ids are read back); the round's other steps train on pairs
    already on the host, with no synchronization of ours, like offline steps."""
    import json

    from fastpo.engine.train import Trainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n"
                               for i in range(4)))
    data = job(tiny_dir, prompts, tmp_path, optimization={"max_steps": 2},
               logging={"log_every": 2}, deepspeed={"enabled": False},
               online={"prompts": str(prompts), "samples_per_prompt": 3, "max_new_tokens": 5,
                       "prompts_per_generation": 4, "steps_per_generation": 2,
                       "scorer": {"function": "length_penalty",
                                  "kwargs": {"limit": 1, "unit": "characters"}}})
    trainer = Trainer(config_from_dict(data))
    with SyncCounter() as first:
        trainer.train_step()
    assert len(ours(first.hits)) > 0  # generation: counted, and attributed to us
    assert trainer.source.round is not None and trainer.source.step_in_round == 1
    with SyncCounter() as second:
        record = trainer.train_step()
    assert ours(second.hits) == [], ours(second.hits)
    _third_party_bounded(second.hits, micro_batches=1)
    assert trainer.source.round is None  # the round is used up
    trainer.read_metrics()
    assert record["tokens"] > 0 and record["online/pairs"] == 2 and not record["skipped"]
