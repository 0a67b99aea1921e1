"""The reference strategies behind one interface: what the trainer calls, each strategy's answer."""

import copy

import pytest
import torch

from fastpo.engine.model import reference as R
from fastpo.engine.model import reference_cache as RC


def test_every_strategy_is_a_reference_strategy():
    for cls in (R.NoReference, R.FrozenReference, R.AdapterDisabledReference,
                RC.CachedReference, RC.PrecomputedReference):
        assert issubclass(cls, R.ReferenceStrategy), cls
    with pytest.raises(TypeError):
        R.ReferenceStrategy()  # reference_logps is abstract


def test_hooks_default_to_nothing_and_refuse_what_they_cannot_do():
    ref = R.NoReference()
    ref.use("eval")
    ref.attach(torch.nn.Linear(2, 2))
    assert ref.state_dict() == {}
    ref.load_state_dict({}, source="x")
    with pytest.raises(ValueError, match="split must be 'train' or 'eval', got 'test'"):
        ref.use("test")
    with pytest.raises(ValueError, match="NoReference cannot follow the policy"):
        ref.soft_update(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match=r"ckpt/reference\.safetensors: a NoReference has no "
                                         r"weights of its own"):
        ref.load_state_dict({"w": torch.zeros(1)}, source="ckpt/reference.safetensors")


def test_frozen_reference_owns_its_weights(tiny_model):
    policy = copy.deepcopy(tiny_model)
    ref = R.FrozenReference(tiny_model)
    assert not ref.model.training and not any(p.requires_grad for p in ref.model.parameters())
    state = ref.state_dict()
    name = next(iter(state))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ref.soft_update(policy, 0.25)
    moved = ref.state_dict()
    torch.testing.assert_close(moved[name], torch.lerp(state[name],
                                                       policy.state_dict()[name], 0.25))
    ref.load_state_dict(state, source="saved")
    torch.testing.assert_close(ref.state_dict()[name], state[name])


def test_adapter_disabled_reference_is_initialised_like_the_others(tiny_model):
    import peft

    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ref = R.AdapterDisabledReference(model, use_fused_linear=False, temperature=0.5)
    assert ref.device is None and ref.temperature == 0.5 and ref.use_fused_linear is False
    assert ref.state_dict() == {}  # its weights are the policy's, saved with the policy
    assert model.training  # the policy is not frozen by it
    other = copy.deepcopy(model)
    ref.attach(other)
    assert ref.model is other
    with pytest.raises(TypeError, match="needs a PEFT model"):
        ref.attach(torch.nn.Linear(2, 2))


class _Cache(RC.CachedReference):
    def __init__(self, value: float) -> None:  # no file: only what the test reads
        self.value = value

    def reference_logps(self, batch, *, with_tail_logps=False):
        return self.value


def test_precomputed_reference_reads_the_cache_of_the_split_in_use():
    ref = RC.PrecomputedReference(_Cache(1.0), _Cache(2.0))
    assert ref.reference_logps(None) == 1.0
    ref.use("eval")
    assert ref.reference_logps(None) == 2.0
    ref.use("train")
    assert ref.reference_logps(None) == 1.0
    empty = RC.PrecomputedReference(_Cache(1.0), None)
    empty.use("eval")
    with pytest.raises(ValueError, match="empty held-out set"):
        empty.reference_logps(None)
