"""``import fastpo``: the public names, their documentation, and what importing costs."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

import fastpo

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {
    "sequence_logps", "token_logps", "linear_sequence_logps", "linear_token_logps",
    "SequenceLogps", "backend_info", "preference_loss", "kto_loss", "cpo_loss", "orpo_loss",
    "patch_trainer",
    "FusedLinearDPOLoss", "FusedLinearCPOLoss", "FusedLinearSimPOLoss", "FusedLinearORPOLoss",
    "FusedLinearKTOLoss",
    "fused_linear_dpo_loss", "fused_linear_cpo_loss", "fused_linear_simpo_loss",
    "fused_linear_orpo_loss", "fused_linear_kto_loss",
}
HEAVY = ("trl", "transformers", "deepspeed", "peft", "datasets", "pydantic", "yaml",
         "safetensors", "liger_kernel")
TRAIN_PACKAGES = ("transformers", "peft", "deepspeed", "datasets", "safetensors", "yaml",
                  "pydantic", "tqdm", "psutil")


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from outside the repository (the installed package)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT / "tests", timeout=300)


def test_all_is_the_public_surface_sorted():
    assert set(fastpo.__all__) == PUBLIC
    assert list(fastpo.__all__) == sorted(fastpo.__all__)
    extra = {name for name in dir(fastpo) if not name.startswith("_")} - PUBLIC
    assert extra == {"engine", "kernels"}, f"public names outside __all__: {extra}"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_is_documented_and_typed(name):
    obj = getattr(fastpo, name)
    assert inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 40, f"{name} has no docstring"
    if inspect.isclass(obj):
        if issubclass(obj, tuple):  # SequenceLogps: a typed NamedTuple
            assert set(typing.get_type_hints(obj)) == set(obj._fields)
            return
        functions = [obj.__init__, obj.forward]
    else:
        functions = [obj]
    for fn in functions:
        hints = typing.get_type_hints(fn)
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = [p.name for p in params if p.name not in hints]
        assert not missing, f"{name}.{fn.__name__}: parameters without a type hint: {missing}"
        assert "return" in hints, f"{name}.{fn.__name__} has no return type"


def test_the_names_are_the_submodules_objects():
    from fastpo import kernels
    from fastpo.engine import losses
    from fastpo.engine.losses import fused_linear as fused_linear_losses
    from fastpo.engine.losses import modules as loss_modules

    assert fastpo.sequence_logps is kernels.sequence_logps
    assert fastpo.linear_sequence_logps is kernels.linear_sequence_logps
    assert fastpo.preference_loss is losses.preference_loss
    assert fastpo.FusedLinearDPOLoss is loss_modules.FusedLinearDPOLoss
    assert fastpo.fused_linear_kto_loss is fused_linear_losses.fused_linear_kto_loss


def test_patch_trainer_mirrors_the_integration_signature():
    from fastpo.engine.integrations.trl import patch_trainer

    ours = inspect.signature(fastpo.patch_trainer).parameters
    theirs = inspect.signature(patch_trainer).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.values()]


def test_packages_resolve_to_the_source_folders():
    assert Path(fastpo.__file__).resolve() == ROOT / "api" / "__init__.py"
    assert Path(fastpo.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(fastpo.engine.__file__).resolve() == ROOT / "engine" / "__init__.py"
    assert not (ROOT / "fastpo").exists(), "a fastpo/ folder at the root shadows the package"


def test_import_is_light_and_patch_trainer_is_lazy():
    result = run_python(f"""
        import sys
        import fastpo
        fastpo.patch_trainer, fastpo.FusedLinearDPOLoss, fastpo.kto_loss
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"import fastpo imported {result.stdout.strip()}"


def test_without_the_train_extra_losses_work_and_the_trainer_names_the_extra():
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in TRAIN_PACKAGES)
    result = run_python(f"""
        import sys
        {block}
        import torch
        import fastpo
        import fastpo.engine.losses, fastpo.engine.losses.modules, fastpo.engine.losses.fused_linear
        out = fastpo.preference_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
                                     torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.1)
        print("loss", round(float(out.loss), 4))
        for name in ("fastpo.engine.train", "fastpo.engine.train.cli", "fastpo.engine.train.loop"):
            try:
                __import__(name)
            except ModuleNotFoundError as exc:
                print(type(exc).__name__, exc)
            else:
                print("imported", name)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "loss 0.6444", lines  # -log σ(0.1 · ((−1+1.5) − (−2+1.5)))
    assert lines[1].startswith("MissingExtraError fastpo.engine.train needs the 'train' extra: "
                               "pip install 'fastpo[train]' ("), lines
    # a module of the train package: its package (the config) needs the extra first
    assert len(lines) == 4, lines
    for line in lines[2:]:
        assert line.startswith("MissingExtraError fastpo.engine.train needs the 'train' extra"), \
            lines


def test_a_missing_package_outside_the_extras_is_not_renamed(tmp_path):
    from fastpo.engine import _extras

    assert _extras.extra_for(ModuleNotFoundError("No module named 'x'", name="x")) is None
    assert _extras.extra_for(ModuleNotFoundError("", name="pydantic.main")) == ("train",
                                                                                "pydantic")
    assert _extras.extra_for(ModuleNotFoundError("", name="trl")) == ("trl", "trl")
    assert _extras.extra_for(ImportError("cannot import name 'x'")) is None


def test_bare_kernels_import_is_the_hub_package(tmp_path):
    """With the repository root on sys.path (``python -m`` or pytest from a checkout), a bare
    ``import kernels`` (transformers >= 5.25 imports the hub package of that name as soon as a
    model class loads) must get the installed hub package, never this folder: not a second
    copy of our ops, and not ``fastpo.kernels`` under a name whose API it does not have."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        hub_installed = importlib.metadata.distribution("kernels") is not None
    except importlib.metadata.PackageNotFoundError:
        hub_installed = False
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import fastpo.kernels\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, vocab_size=32))\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError:\n"
        "    print('absent')\n"
        "else:\n"
        "    assert kernels is not fastpo.kernels\n"
        "    print(kernels.__file__)\n"
        "assert 'fastpo.kernels.ops' in sys.modules\n"
        "assert not any(getattr(m, '__file__', None) and m.__name__.startswith('kernels')\n"
        "               and m.__file__.startswith(sys.argv[1] + '/kernels')\n"
        "               for m in list(sys.modules.values())), 'the checkout imported as kernels'\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(root)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    where = done.stdout.strip().splitlines()[-1]
    if hub_installed:
        assert where != "absent" and not where.startswith(str(root / "kernels")), where
    else:
        assert where == "absent", where
