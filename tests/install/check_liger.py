"""The ``liger`` extra (``pip install 'fastpo[liger]'``), checked in its own venv: fastpo's fused
linear loss modules are drop-in replacements of Liger's chunked ones.

Run by ``install_paths.py`` (``make test-install``) with the fresh venv's python, from outside
the checkout; not collected by pytest. Each fastpo module (DPO, CPO, SimPO, ORPO, KTO) and its
Liger counterpart take the same call (weight, hidden states, targets, bias, ...) on ugly inputs
(odd sizes, prompts of ignored tokens, a padded row); the loss and the gradients of the hidden
states, the weight and the bias agree to fp32 rounding.
"""

from __future__ import annotations

import torch
from check_kernels_only import fail

B, T, H, V = 3, 7, 16, 37
IGNORE = -100
KTO_LABELS = torch.tensor([True, False, True, True, False, False])


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, V, (2 * B, T), generator=g)
    for row in range(2 * B):
        target[row, : 1 + row % 3] = IGNORE
    target[4, 4:] = IGNORE
    return {"x": torch.randn(2 * B, T, H, generator=g), "w": torch.randn(V, H, generator=g) * 0.3,
            "b": torch.randn(V, generator=g) * 0.3, "target": target,
            "rx": torch.randn(2 * B, T, H, generator=g),
            "rw": torch.randn(V, H, generator=g) * 0.3, "rb": torch.randn(V, generator=g) * 0.3}


def run(module, data, extra, hidden_first) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, w, b = (data[k].clone().requires_grad_() for k in ("x", "w", "b"))
    out = module(*((x, w) if hidden_first else (w, x)), data["target"], b, *extra)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), [x.grad, w.grad, b.grad]


def main() -> None:
    import liger_kernel.chunked_loss as liger

    from fastpo.engine.losses import modules as fastpo

    data = batch()
    ref = (data["rx"], data["rw"], data["rb"])
    # name: (Liger's module, fastpo's, options, the arguments after the bias, hidden first?)
    pairs = {
        "DPO": (liger.LigerFusedLinearDPOLoss, fastpo.FusedLinearDPOLoss,
                {"beta": 0.2, "use_ref_model": True}, ref, False),
        "CPO": (liger.LigerFusedLinearCPOLoss, fastpo.FusedLinearCPOLoss, {"beta": 0.2}, (),
                False),
        "SimPO": (liger.LigerFusedLinearSimPOLoss, fastpo.FusedLinearSimPOLoss, {"beta": 2.0},
                  (), False),
        "ORPO": (liger.LigerFusedLinearORPOLoss, fastpo.FusedLinearORPOLoss, {"beta": 0.2},
                 (), False),
        "KTO": (liger.LigerFusedLinearKTOLoss, fastpo.FusedLinearKTOLoss,
                {"beta": 0.2, "use_ref_model": True}, (KTO_LABELS, *ref, torch.tensor(0.1)),
                True),
    }
    for name, (theirs, ours, options, extra, hidden_first) in pairs.items():
        loss_l, grads_l = run(theirs(compiled=False, **options), data, extra, hidden_first)
        loss_f, grads_f = run(ours(**options), data, extra, hidden_first)
        if not torch.isfinite(loss_f) or not torch.allclose(loss_f, loss_l, rtol=1e-5,
                                                            atol=1e-6):
            fail(f"{name}: fastpo's loss {loss_f.item()} vs Liger's {loss_l.item()}")
        for what, a, e in zip(("hidden", "weight", "bias"), grads_f, grads_l):
            atol = max(1e-6, 2 * torch.finfo(torch.float32).eps * e.abs().max().item())
            if a is None or not torch.allclose(a, e, rtol=1e-5, atol=atol):
                err = None if a is None else (a - e).abs().max().item()
                fail(f"{name}: gradient of the {what} differs from Liger's (max error {err})")
    from importlib.metadata import version

    print(f"liger install: ok (liger-kernel {version('liger-kernel')}: {', '.join(pairs)} "
          "losses and gradients match)")

if __name__ == "__main__":
    main()
