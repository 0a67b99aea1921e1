"""Which TRL ``patch_trainer`` accepts: the gate for releases without the fused LM head, and the
feature probe of the forward TRL installs (run on the installed, pinned TRL).

The comparison of losses across every supported release is ``python -m benchmarks.trl_matrix``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration is tested with TRL installed")

import trl.trainer.utils as trl_utils  # noqa: E402
from packaging.version import Version  # noqa: E402

from fastpo.engine.data.assets import tiny_llama_config  # noqa: E402
from fastpo.engine.integrations import trl as fastpo_trl  # noqa: E402
from fastpo.engine.integrations import trl_compat  # noqa: E402


def _tiny():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(101, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1))


def test_installed_trl_passes_the_probe():
    installed = trl_compat.installed_trl_version()
    assert installed == trl.__version__
    assert Version(installed) >= Version(trl_compat.MIN_TRL_VERSION)
    assert trl_compat.check_trl() is trl_utils


@pytest.mark.parametrize("missing", ["add_fused_lm_head", "FusedCausalLMOutput"])
def test_older_trl_is_refused_with_the_minimum_version(monkeypatch, missing):
    """A TRL 1.0-1.14 has no fused head: refused before anything is patched, naming versions."""
    monkeypatch.delattr(trl_utils, missing)
    monkeypatch.setattr(trl, "__version__", "1.14.2")
    message = r"fastpo\.patch_trainer needs trl >= 1\.15 \(installed: 1\.14\.2\)"
    with pytest.raises(ImportError, match=message) as info:
        fastpo_trl.patch_trainer(object())  # the gate comes before the trainer type check
    assert missing in str(info.value)
    with pytest.raises(ImportError, match=message):
        trl_compat.check_trl()


def test_missing_trl_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trl(name, *args, **kwargs):
        if name == "trl" or name.startswith("trl."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trl)
    with pytest.raises(ImportError, match=r"needs trl \(pip install 'trl>=1\.15'\)"):
        trl_compat.check_trl()


def test_feature_probe_reads_every_setting_of_the_installed_head():
    model = _tiny()
    trl_utils.add_fused_lm_head(model, temperature=0.7, cast_lm_head_to_fp32=True,
                                outputs=("log_probs", "entropy"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown setting in the pinned TRL
        closure = trl_compat.fused_head_closure(model.forward)
    assert closure is not None and set(trl_compat.READ_SETTINGS) <= set(closure)
    state = fastpo_trl.patch_model(model)
    assert state.settings == fastpo_trl.HeadSettings(
        temperature=0.7, logit_scale=1.0, softcap=None, cast_lm_head_to_fp32=True,
        outputs=frozenset({"log_probs", "entropy"}), backbone_attr="base_model")
    # a forward that is not TRL's fused head is not mistaken for one
    assert trl_compat.fused_head_closure(_tiny().forward) is None
    assert trl_compat.fused_head_closure(None) is None


def _fake_fused_forward(*, drop: str | None = None, extra: str | None = None):
    """A forward shaped like the one add_fused_lm_head installs, with one setting dropped or one
    unknown setting added to its closure."""
    settings = {name: 1.0 for name in trl_compat.KNOWN_SETTINGS}
    if drop:
        settings.pop(drop)
    if extra:
        settings[extra] = 2.0
    names = ", ".join(settings)
    source = (f"def outer({names}):\n"
              "    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,\n"
              "                num_items_in_batch=None, **kwargs):\n"
              f"        return ({names},)\n"
              "    return forward\n")
    scope: dict = {}
    exec(source, scope)  # builds a closure with exactly these variables
    module = torch.nn.Linear(1, 1)
    return scope["outer"](*settings.values()).__get__(module)


def test_feature_probe_refuses_a_head_without_a_setting_fastpo_reads():
    assert trl_compat.fused_head_closure(_fake_fused_forward()) is not None
    with pytest.raises(RuntimeError, match=r"trl .*: the fused LM head's forward lacks "
                                           r"temperature, which fastpo reads"):
        trl_compat.fused_head_closure(_fake_fused_forward(drop="temperature"))


def test_feature_probe_names_an_unknown_setting():
    with pytest.warns(RuntimeWarning, match=r"settings fastpo does not read \(logit_bias\)"):
        closure = trl_compat.fused_head_closure(_fake_fused_forward(extra="logit_bias"))
    assert closure["logit_bias"] == 2.0
