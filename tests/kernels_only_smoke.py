"""The kernels-only install (``pip install .``: torch, triton, numpy), checked in its own venv.

Run by ``.ci/run`` with the fresh venv's python after a regular (non-editable) install, from
outside the repository; not collected by pytest. Checks that the trainer's packages are really
absent, that ``import fastpo`` gives the ops and the losses (forward and backward on CPU, against
float64), and that importing the trainer names the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

import fastpo

TRAIN_PACKAGES = ("transformers", "peft", "deepspeed", "datasets", "safetensors", "yaml",
                  "pydantic", "tqdm", "psutil", "trl", "liger_kernel")


def fail(message: str) -> None:
    print(f"kernels-only smoke: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    present = [name for name in TRAIN_PACKAGES if importlib.util.find_spec(name) is not None]
    if present:
        fail(f"packages of the extras are installed, so this proves nothing: {present}")
    root = Path(fastpo.__file__).resolve().parent
    for module in (fastpo.kernels, fastpo.engine):
        if Path(module.__file__).resolve().parent.parent != root:
            fail(f"{module.__name__} is at {module.__file__}, not inside {root} "
                 "(expected a regular, non-editable install)")

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 9, 51, generator=gen) * 2).requires_grad_()
    labels = torch.randint(0, 51, (4, 9), generator=gen)
    labels[:, :3] = -100
    seq = fastpo.sequence_logps(logits, labels, shift=True)
    ref_logp = torch.log_softmax(logits.detach().double(), -1)[:, :-1]
    shifted = labels[:, 1:]
    picked = ref_logp.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = torch.where(shifted != -100, picked, torch.zeros_like(picked)).sum(-1)
    torch.testing.assert_close(seq.logps.double(), ref, rtol=1e-5, atol=1e-5)
    chosen, rejected = seq.logps[:2], seq.logps[2:]
    out = fastpo.preference_loss(chosen, rejected, chosen.detach() + 0.1,
                                 rejected.detach() - 0.1, beta=0.1)
    out.loss.backward()
    if logits.grad is None or not torch.isfinite(logits.grad).all():
        fail("no finite gradient reached the logits")
    if (logits.grad[:, -1] != 0).any():
        fail("shift=True scored the last position")

    try:
        importlib.import_module("fastpo.engine.train")
    except ModuleNotFoundError as exc:
        want = "fastpo.engine.train needs the 'train' extra: pip install 'fastpo[train]'"
        if want not in str(exc):
            fail(f"the error does not name the extra: {exc}")
        hint = str(exc)
    else:
        fail("fastpo.engine.train imported without the train extra")

    print(f"kernels-only install: ok (fastpo at {root}; loss {out.loss.item():.4f}; "
          f"backends {fastpo.backend_info()['cpu']}; without the extra: {hint})")


if __name__ == "__main__":
    main()
