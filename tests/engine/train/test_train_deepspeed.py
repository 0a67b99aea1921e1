"""The DeepSpeed backend, and the DeepSpeed behaviour it relies on beyond the public API (which
fails here first if an installed DeepSpeed changes under it)."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import isolated_launch, job, losses, merge, run


def test_deepspeed_lora_checkpoint_leaves_out_a_frozen_tied_head(tokenizer, pairs_file, tmp_path):
    """The frozen lm_head of a tied model is the embedding under a second name: not saved."""
    from trainer_helpers import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    sections = dict(model={"lora": lora}, deepspeed={"enabled": True},
                    optimization={"max_steps": 3}, checkpoint={"every_steps": 2})
    saved = job(model_dir, pairs_file, tmp_path / "a", **sections)
    first = run(saved)
    from fastpo.engine.train.safe_load import deepspeed_safe_globals, torch_load

    states = torch_load(tmp_path / "a" / "checkpoints" / "step-00000002" / "deepspeed"
                        / "mp_rank_00_model_states.pt", map_location="cpu",
                        allow=deepspeed_safe_globals())
    names = list(states["module"])
    assert names and all("lora_" in name for name in names), names  # adapters only
    resumed = run(merge(saved, {"logging": {"output_dir": str(tmp_path / "b")},
                                "checkpoint": {"resume": str(tmp_path / "a" / "checkpoints"
                                                             / "step-00000002")}}))
    assert [r["step"] for r in resumed.history] == [3]
    assert losses(resumed.history) == pytest.approx(losses(first.history)[2:], rel=1e-6)


# ------------------------------------------- DeepSpeed beyond its public API, on the installed one
@pytest.fixture
def process_group():
    """A one-rank gloo process group through DeepSpeed, gone afterwards."""
    import os

    import deepspeed

    from fastpo.engine.train.runtime import skip_deepspeed_shm_op

    with isolated_launch():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend="gloo")
        yield


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TiedLM(torch.nn.Module):
    """An embedding and a head sharing one weight (frozen), and a trainable layer between."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight
        self.embed.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def deepspeed_backend(module: torch.nn.Module, stage: int, **settings):
    from fastpo.engine.train.config import TrainConfig
    from fastpo.engine.train.deepspeed_backend import DeepSpeedBackend

    ds_config = {**settings, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    return DeepSpeedBackend(module, TrainConfig.model_validate({}), ds_config, total_steps=4)


def test_a_skipped_step_is_reported_by_was_step_applied(process_group):
    """ZeRO-1 finds the NaN gradient and skips the update; the backend reads that from the
    engine's public ``was_step_applied()``, and a finite step after it is applied."""
    torch.manual_seed(0)
    backend = deepspeed_backend(TiedLM(), stage=1)
    ids = torch.tensor([[1, 2, 3]])
    before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    backend.backward(backend.model(ids).sum() * float("nan"))
    skipped = backend.step()
    assert skipped.applied is False and "DeepSpeed skipped the update" in skipped.reason
    assert all(torch.equal(p, before[n]) for n, p in backend.module.named_parameters())
    backend.backward(backend.model(ids).square().mean())
    applied = backend.step()
    assert applied.applied is True and applied.reason == ""
    assert not torch.equal(backend.module.body.weight, before["body.weight"])


def test_without_zero_an_unfused_optimizer_reads_the_norm_before_the_step(process_group):
    """fp32 without ZeRO, a user's optimizer that is not fused torch AdamW (no ``found_inf``):
    the backend reads the gradient norm first and steps without an update: parameters and
    optimizer state as before, DeepSpeed's clipping on (it needs gradients), the schedule moving
    on; a finite step after it is applied (the generated config's fused AdamW skips on the device
    instead: test_host_syncs.py)."""
    torch.manual_seed(0)
    backend = deepspeed_backend(TiedLM(), stage=0, gradient_clipping=1.0)
    assert backend.precheck and not backend.skip_on_device
    ids = torch.tensor([[1, 2, 3]])
    backend.backward(backend.model(ids).square().mean())
    assert backend.step().applied is True
    state = copy.deepcopy(backend.engine.optimizer.state_dict()["state"])
    before = {n: p.detach().clone() for n, p in backend.module.named_parameters()}
    lr = backend.lr()
    backend.backward(backend.model(ids).sum() * float("nan"))
    skipped = backend.step()
    assert skipped.applied is False and "non-finite" in skipped.reason
    assert all(torch.equal(p, before[n]) for n, p in backend.module.named_parameters())
    after = backend.engine.optimizer.state_dict()["state"]
    assert after.keys() == state.keys() and all(
        torch.equal(after[k][name], state[k][name]) for k in state for name in state[k])
    assert backend.lr() != lr and backend.engine.global_steps == 2  # the schedule moved on
    backend.backward(backend.model(ids).square().mean())
    assert backend.step().applied is True
    assert not torch.equal(backend.module.body.weight, before["body.weight"])


def test_a_frozen_tied_head_stays_out_of_the_checkpoint(process_group, tmp_path):
    """DeepSpeed drops frozen parameters by name and so still writes a tied frozen head under
    its second name; the backend's ``module_state_dict`` override (the one reach past the public
    API) leaves it out. If DeepSpeed stops writing the alias itself, the first assertion says
    so and the override can go; if ``save_checkpoint`` stops going through
    ``module_state_dict``, the second one fails."""
    from fastpo.engine.train.safe_load import deepspeed_safe_globals, torch_load

    backend = deepspeed_backend(TiedLM(), stage=0)
    written = {}
    for name, save in (("plain", lambda folder: backend.engine.save_checkpoint(
            str(folder), tag=backend.TAG, save_latest=False, exclude_frozen_parameters=True)),
                       ("backend", lambda folder: backend.save(folder, rank=0,
                                                               include_frozen=False))):
        save(tmp_path / name)
        states = torch_load(tmp_path / name / backend.TAG / "mp_rank_00_model_states.pt",
                            allow=deepspeed_safe_globals())
        written[name] = sorted(states["module"])
    assert written["plain"] == ["body.bias", "body.weight", "head.weight"], written
    assert written["backend"] == ["body.bias", "body.weight"], written
    assert "module_state_dict" not in vars(backend.engine)  # the override ended with the save


def test_deepspeed_still_builds_its_shm_op_where_it_is_skipped():
    """``skip_deepspeed_shm_op`` replaces ``deepspeed.comm.torch.build_shm_op``: DeepSpeed's torch
    communication backend must still call that module function when it starts."""
    import inspect
    import sys

    import deepspeed.comm.torch  # noqa: F401

    from fastpo.engine.train.runtime import skip_deepspeed_shm_op

    module = sys.modules["deepspeed.comm.torch"]
    assert callable(getattr(module, "build_shm_op", None))
    assert "build_shm_op()" in inspect.getsource(module.TorchBackend.__init__)
    skip_deepspeed_shm_op()
    assert module.build_shm_op() is None


def test_the_safe_checkpoint_engine_is_the_one_deepspeed_uses(process_group, tmp_path):
    """Every DeepSpeed checkpoint file is written and read through the engine's
    ``checkpoint_engine``: the backend puts the hashing, ``weights_only`` one there."""
    from fastpo.engine.train.integrity import CheckpointError

    backend = deepspeed_backend(TiedLM(), stage=0)
    assert type(backend.engine.checkpoint_engine).__name__ == "SafeTorchCheckpointEngine"
    backend.save(tmp_path, rank=0, include_frozen=False)
    states = tmp_path / backend.TAG / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "code": TiedLM}, states)  # a class: refused, never unpickled
    with pytest.raises(CheckpointError, match="refused to load"):
        backend.load(tmp_path)
