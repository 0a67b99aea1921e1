"""The kernels-only install (``pip install fastpo``: torch, triton, numpy), checked in its own venv.

Run by ``install_paths.py`` (``make test-install``) with the fresh venv's python, from outside
the checkout; not collected by pytest. Checks that the extras' packages are really absent, that
``import fastpo`` gives the ops and the losses on every CPU backend the install has (forward and
backward against float64 on ugly inputs), that none of the trainer's modules got imported
along the way, and that importing the trainer names the extra to install.
:func:`check_ops` is also run by ``check_train.py``, where those packages are installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

import fastpo
from fastpo.kernels import native, use_cpu_backend

EXTRA_PACKAGES = ("transformers", "peft", "deepspeed", "datasets", "safetensors", "yaml",
                  "pydantic", "tqdm", "psutil", "trl", "liger_kernel")
# what the ops and the losses must never import: the trainer's frameworks and layers (not the
# small libraries of the extras, which torch itself imports where present: tqdm, yaml, ...)
NOT_IMPORTED = ("transformers", "deepspeed", "peft", "datasets", "trl", "liger_kernel",
                "fastpo.engine.data", "fastpo.engine.model", "fastpo.engine.online",
                "fastpo.engine.train", "fastpo.engine.integrations")
IGNORE = -100


def fail(message: str) -> None:
    print(f"{Path(sys.argv[0]).name}: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 result against its float64 reference, relative to the reference's scale."""
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want).abs().max().item()
    if not err <= 1e-5 * scale:
        fail(f"{name}: max error {err:.3g} against float64 (scale {scale:.3g})")


def _logits_case(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[4, 9, 51] logits viewed from a wider buffer (strided), a prompt of 3 ignored labels, a
    row with no scored label, and a -inf logit that no label points at."""
    wide = torch.randn(4, 9, 64, generator=gen) * 3
    logits = wide[..., :51]
    labels = torch.randint(0, 51, (4, 9), generator=gen)
    labels[:, :3] = IGNORE
    labels[2] = IGNORE
    logits[1, 4, (labels[1, 5] + 1) % 51] = float("-inf")
    return logits, labels


def _scored_sums(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The float64 reference: per row, the sum of log p(label) over the scored labels."""
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != IGNORE, picked, torch.zeros_like(picked)).sum(-1)


def _from_logits(backend: str, gen: torch.Generator) -> None:
    logits, labels = _logits_case(gen)
    leaf = logits.detach().clone().requires_grad_()
    view = torch.cat([leaf, torch.zeros(4, 9, 13)], -1)[..., :51]  # a strided input
    out = fastpo.sequence_logps(view, labels, shift=True)
    ref_leaf = logits.detach().double().requires_grad_()
    ref = _scored_sums(torch.log_softmax(ref_leaf, -1)[:, :-1], labels[:, 1:])
    close(f"[{backend}] sequence_logps forward", out.logps, ref.detach())
    upstream = torch.randn(4, generator=gen)
    out.logps.backward(upstream)
    ref.backward(upstream.double())
    close(f"[{backend}] sequence_logps gradient", leaf.grad, ref_leaf.grad)
    if (leaf.grad[:, -1] != 0).any() or (leaf.grad[2] != 0).any():
        fail(f"[{backend}] a position without a scored label got a gradient")


def _linear(backend: str, gen: torch.Generator) -> None:
    hidden = torch.randn(2, 7, 24, generator=gen).requires_grad_()
    weight = (torch.randn(37, 24, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, 37, (2, 7), generator=gen)
    labels[0, :2] = IGNORE
    out = fastpo.linear_sequence_logps(hidden, weight, labels)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = _scored_sums(torch.log_softmax(h64 @ w64.T, -1), labels)
    close(f"[{backend}] linear_sequence_logps forward", out.logps, ref.detach())
    upstream = torch.randn(2, generator=gen)
    out.logps.backward(upstream)
    ref.backward(upstream.double())
    close(f"[{backend}] linear_sequence_logps hidden gradient", hidden.grad, h64.grad)
    close(f"[{backend}] linear_sequence_logps weight gradient", weight.grad, w64.grad)


def _loss(gen: torch.Generator) -> float:
    """DPO's sigmoid loss: −log σ(β((c − c_ref) − (r − r_ref))), mean over the pairs."""
    chosen, rejected, ref_chosen, ref_rejected = torch.randn(4, 3, generator=gen) * 4
    chosen.requires_grad_()
    out = fastpo.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    out.loss.backward()
    c64 = chosen.detach().double().requires_grad_()
    want = torch.nn.functional.softplus(
        -0.1 * ((c64 - ref_chosen.double()) - (rejected.double() - ref_rejected.double()))).mean()
    want.backward()
    close("preference_loss (sigmoid)", out.loss.detach(), want.detach())
    close("preference_loss (sigmoid) gradient", chosen.grad, c64.grad)
    return out.loss.item()


def cpu_backends() -> list[str]:
    """The CPU backends this install can run: torch always, native where it was built, Triton
    (interpreted) where ``TRITON_INTERPRET=1``."""
    return ["torch"] + (["native"] if native.AVAILABLE else []) + (
        ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def check_ops() -> str:
    """The ops (forward and backward, every CPU backend) and a loss against float64; then no
    trainer module imported. A one-line summary."""
    gen = torch.Generator().manual_seed(0)
    backends = cpu_backends()
    for backend in backends:
        with use_cpu_backend(backend):
            _from_logits(backend, gen)
            _linear(backend, gen)
    loss = _loss(gen)
    imported = sorted(m for m in sys.modules
                      if any(m == p or m.startswith(p + ".") for p in NOT_IMPORTED))
    if imported:
        fail(f"the ops imported modules of the extras or the trainer: {imported[:8]}")
    return f"ops against float64 on {backends}, loss {loss:.4f}, no trainer module imported"


def main() -> None:
    present = [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is not None]
    if present:
        fail(f"packages of the extras are installed, so this proves nothing: {present}")
    root = Path(fastpo.__file__).resolve().parent
    for module in (fastpo.kernels, fastpo.engine):
        if Path(module.__file__).resolve().parent.parent != root:
            fail(f"{module.__name__} is at {module.__file__}, not inside {root} "
                 "(expected a regular, non-editable install)")
    summary = check_ops()
    try:
        importlib.import_module("fastpo.engine.train")
    except ModuleNotFoundError as exc:
        want = "fastpo.engine.train needs the 'train' extra: pip install 'fastpo[train]'"
        if want not in str(exc):
            fail(f"the error does not name the extra: {exc}")
        hint = str(exc)
    else:
        fail("fastpo.engine.train imported without the train extra")
    print(f"kernels-only install: ok (fastpo at {root}; {summary}; backends "
          f"{fastpo.backend_info()['cpu']}; without the extra: {hint})")


if __name__ == "__main__":
    main()
