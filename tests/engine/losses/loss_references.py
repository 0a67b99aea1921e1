"""Independent double-precision references and batches for the loss tests (not collected).

The formulas use only ``math`` on Python floats, one element at a time, so they share no code
with ``fastpo.engine``.
"""

from __future__ import annotations

import math
import random

import torch

from fastpo.engine.losses import preference_loss

BETA = 0.1


# ----------------------------------------------------------------------------------------------
# scalar references
# ----------------------------------------------------------------------------------------------
def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def f_score(u: float, fdiv: str, a: float) -> float:
    if fdiv == "reverse_kl":
        return u
    if fdiv == "forward_kl":
        return 1.0 - math.exp(-u)
    if fdiv == "js_divergence":
        return math.log(2.0 / (1.0 + math.exp(-u)))
    assert fdiv == "alpha_divergence"
    return (1.0 - math.exp(-u) ** a) / a


def smoothed(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def ref_dpo(t, pc, pr, rc, rr, nc, nr, *, beta=BETA, eps=0.0, tau=0.05, fdiv="reverse_kl", a=0.5):
    """Per-pair loss of TRL DPO loss type ``t`` on lists of floats."""
    n = len(pc)
    rho_c = [pc[i] - rc[i] for i in range(n)]
    rho_r = [pr[i] - rr[i] for i in range(n)]
    if t == "aot":
        pol = sorted(pc[i] - pr[i] for i in range(n))
        ref = sorted(rc[i] - rr[i] for i in range(n))
        return [smoothed(beta * (pol[i] - ref[i]), eps) for i in range(n)]
    if t == "aot_unpaired":
        c, r = sorted(rho_c), sorted(rho_r)
        return [smoothed(beta * (c[i] - r[i]), eps) for i in range(n)]
    if t == "sft":  # per pair −π_c[i] / n̄ (n̄ the mean chosen length): mean = NLL per token
        return [-pc[i] * n / max(1, sum(nc)) for i in range(n)]
    out = []
    for i in range(n):
        sc, sr = f_score(rho_c[i], fdiv, a), f_score(rho_r[i], fdiv, a)
        z = beta * (sc - sr)
        lc, lr = max(nc[i], 1), max(nr[i], 1)
        if t == "sigmoid":
            v = smoothed(z, eps)
        elif t == "hinge":
            v = max(0.0, 1.0 - z)
        elif t == "ipo":
            v = (sc / lc - sr / lr - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            v = sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
        elif t == "nca_pair":
            x, y = beta * rho_c[i], beta * rho_r[i]
            v = -logsig(x) - 0.5 * logsig(-x) - 0.5 * logsig(-y)
        elif t == "robust":
            v = ((1 - eps) * -logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
        elif t == "bco_pair":
            v = -logsig(beta * rho_c[i]) - logsig(-beta * rho_r[i])
        elif t == "sppo_hard":
            v = (rho_c[i] - 0.5 / beta) ** 2 + (rho_r[i] + 0.5 / beta) ** 2
        elif t == "apo_zero":
            v = (1 - sig(beta * rho_c[i])) + sig(beta * rho_r[i])
        elif t == "apo_down":
            v = sig(beta * rho_c[i]) + (1 - sig(beta * (rho_c[i] - rho_r[i])))
        elif t == "discopop":
            m = sig(z / tau)
            # m · e^(−z), written as e^(log m − z) so that it stays finite for z ≪ 0
            v = (1 - m) * -logsig(z) + math.exp(logsig(z / tau) - z)
        elif t == "sigmoid_norm":
            v = -logsig(beta * (sc / lc - sr / lr))
        else:
            raise AssertionError(t)
        out.append(v)
    return out


def ref_cpo(t, pc, pr, nc, nr, *, beta=BETA, eps=0.0, cpo_alpha=1.0, gamma=0.5, alpha=0.0):
    n = len(pc)
    mean_len = max(1, sum(nc)) / n  # the NLL per pair: −π_c[i] / mean_len (mean: per token)
    out = []
    for i in range(n):
        c, r = pc[i], pr[i]
        if t in ("ipo", "simpo", "alphapo"):
            c, r = c / max(1, nc[i]), r / max(1, nr[i])
        if alpha:
            c, r = (1 - math.exp(c) ** -alpha) / alpha, (1 - math.exp(r) ** -alpha) / alpha
        if t == "sigmoid":
            v = smoothed(beta * (c - r), eps)
        elif t == "hinge":
            v = max(0.0, 1 - beta * (c - r))
        elif t == "ipo":
            v = (c - r - 1 / (2 * beta)) ** 2
        else:
            v = smoothed(beta * (c - r) - gamma, eps)
        out.append(v + (0.0 if t == "alphapo" else cpo_alpha) * (-pc[i] / mean_len))
    return out


def ref_kto(p, r, d, z0, *, beta=BETA, wd=1.0, wu=1.0, apo=False):
    out = []
    for i in range(len(p)):
        rho = p[i] - r[i]
        if apo:
            v = wd * (1 - sig(beta * rho)) if d[i] else wu * sig(beta * rho)
        else:
            v = wd * (1 - sig(beta * (rho - z0))) if d[i] else wu * (1 - sig(beta * (z0 - rho)))
        out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------
def moderate_batch(b: int = 7, seed: int = 0) -> dict[str, list]:
    """Realistic summed log-probs; the reference close to the policy; one empty completion."""
    rng = random.Random(seed)
    nc = [rng.randint(1, 40) for _ in range(b)]
    nr = [rng.randint(1, 40) for _ in range(b)]
    nc[2] = 0
    pc = [-rng.uniform(0.2, 2.0) * n for n in nc]
    pr = [-rng.uniform(0.2, 2.0) * n for n in nr]
    rc = [p + rng.gauss(0, 3) for p in pc]
    rr = [p + rng.gauss(0, 3) for p in pr]
    return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "nc": nc, "nr": nr}


def extreme_batch() -> dict[str, list]:
    """Log-ratios of ±1e4 and 0 mixed, empty completions, equal logps."""
    e = 1e4
    return {
        "pc": [-e, -1.0, -e, -3.0, -50.0, 0.0, -e],
        "pr": [-1.0, -e, -e, -2.0, -e, 0.0, -0.5],
        "rc": [-1.0, -e, -e, -3.0, -e, -e, -0.5],
        "rr": [-e, -1.0, -e, -1.0, -50.0, 0.0, -e],
        "nc": [3, 9, 1, 4, 0, 0, 7],
        "nr": [5, 2, 1, 0, 6, 0, 11],
    }


def tensors(batch, dtype=torch.float64, grad=False):
    out = {k: torch.tensor(batch[k], dtype=dtype) for k in ("pc", "pr", "rc", "rr")}
    out.update({k: torch.tensor(batch[k], dtype=torch.int64) for k in ("nc", "nr")})
    if grad:
        out["pc"].requires_grad_(True)
        out["pr"].requires_grad_(True)
    return out


def finite_grads(*leaves) -> bool:
    """Every gradient is finite (a leaf a loss does not use has none, which is fine)."""
    return all(v.grad is None or bool(torch.isfinite(v.grad).all()) for v in leaves)


def dpo(t, x, **kwargs):
    return preference_loss(
        x["pc"],
        x["pr"],
        x["rc"],
        x["rr"],
        loss_type=t,
        chosen_num_tokens=x["nc"],
        rejected_num_tokens=x["nr"],
        **kwargs,
    )


def smoothing_for(t: str) -> float:
    return {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.05}.get(
        t, 0.0
    )
