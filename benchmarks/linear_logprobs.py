"""Fused linear logprobs against the alternatives: a DPO step on the lm_head, time and memory.

    python -m benchmarks.linear_logprobs                      CPU headline (B8×T512, H576, V49152)
    python -m benchmarks.linear_logprobs --device cuda        GPU headline (32k tokens, H4096,
                                                              V128256, bf16)
    options: --impls naive,liger,liger_compiled,fastpo  --prompt 0.25  --reps 3  --threads 2
             --batch/--seq/--hidden/--vocab/--dtype  --chunk-tokens/--chunk-vocab  --json FILE

The workload is the policy side of a DPO step on the output layer: per-sequence log-probs of the
label tokens from final hidden states ``[B, T, H]`` and the lm_head weight ``[V, H]``, the sigmoid
DPO loss (β = 0.1, reference log-probs 0, rows = chosen ‖ rejected), and the gradients of hidden
states and weight (allocated by each call, so they count in its memory; the "working" column
subtracts their size, ``(B·T + V)·H`` elements, to show what each implementation adds on top of
the gradients it must return). Implementations:

    naive           ``hidden @ W.T`` → ``log_softmax`` → ``gather`` → masked sum
    liger           Liger's ``LigerFusedLinearDPOLoss`` (chunked PyTorch), eager
    liger_compiled  the same with ``compiled=True`` (torch.compile of its chunk step)
    fastpo          ``fastpo.kernels.linear_sequence_logps``, then the loss
    fastpo_loss_fused  ``fastpo.FusedLinearDPOLoss(design="loss-fused")``: the loss inside the
                    op, every gradient made in the forward, 6·N·V·H executed (its "auto" takes
                    this design on CUDA where the cost model predicts a win, never on CPU)
    cce             Cut Cross-Entropy ``linear_cross_entropy(reduction="none", impl="cce")``
                    with its default gradient filter (``filter_eps="high"``: not exact; CUDA
                    only); ``cce_filtered`` names the same row, ``cce_exact`` runs it with
                    ``filter_eps=None`` (every gradient entry computed)
    matmul          not a DPO step: one ``h_scored @ W.T`` in the input dtype, the machine's
                    matmul rate at this shape (the yardstick of the TFLOP/s column)

TFLOP/s counts the matmul work of a DPO step that keeps its logits, 6·N·V·H for N scored tokens
(forward, grad_h, grad_W; one matmul, 2·N·V·H, for the ``matmul`` row), whatever an
implementation actually runs: fastpo recomputes the logits in the backward (8·N·V·H executed),
fastpo_loss_fused does not (6·N·V·H), and it and the others compute prompt and padding positions
too. "% of matmul" divides by the ``matmul`` row's rate.

Labels: ``--prompt`` is the fraction of each row that is prompt (``-100``; 0.25 by default, plus
~3% trailing padding); ``--prompt 0`` scores every token, the worst case for fastpo, which drops
unscored tokens before any compute while the others compute logits for every position.

Each implementation runs in a fresh process (``benchmarks.harness``): warm-up call(s), one call
for the peak extra memory (CPU: resident-set high-water mark over its value before the call;
CUDA: allocator peak), then ``--reps`` timed calls. ``--rounds N`` repeats the whole set N times,
implementations interleaved, and reports the median over all timed calls, so that a change in
the machine's load during the run does not favour whichever implementation ran at a quiet
moment. All implementations print the same loss (to float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

import torch

from benchmarks.harness import (
    REPO_ROOT,
    RESULT_MARKER,
    Workload,
    machine_info,
    masked_labels,
    measure,
    worker_env,
)

BETA = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("naive", "liger", "liger_compiled", "fastpo", "fastpo_loss_fused", "cce", "cce_exact",
         "cce_filtered", "matmul")
CCE_IMPLS = ("cce", "cce_exact", "cce_filtered")


def cce_filter_eps(impl: str) -> str | None:
    """Cut Cross-Entropy's ``filter_eps`` of a row: None for ``cce_exact`` (no gradient entry
    skipped), else its default "high" (gradient blocks below a threshold skipped)."""
    return None if impl == "cce_exact" else "high"
HEADLINE = {
    "cpu": {"batch": 8, "seq": 512, "hidden": 576, "vocab": 49152, "dtype": "fp32",
            "impls": "naive,liger,liger_compiled,fastpo,fastpo_loss_fused,matmul"},
    "cuda": {"batch": 32, "seq": 1024, "hidden": 4096, "vocab": 128256, "dtype": "bf16",
             "impls": "naive,liger,fastpo,fastpo_loss_fused,cce,matmul"},
}


def dpo_loss(seq_logps: torch.Tensor) -> torch.Tensor:
    """−log σ(β (chosen − rejected)), mean over pairs; reference log-probs 0."""
    chosen, rejected = seq_logps.float().chunk(2)
    return -torch.nn.functional.logsigmoid(BETA * (chosen - rejected)).mean()


def build(cfg: dict[str, Any]) -> Workload:
    """One forward + backward of the DPO loss for implementation ``cfg["impl"]``."""
    device, impl = cfg["device"], cfg["impl"]
    if impl in CCE_IMPLS and device != "cuda":
        raise RuntimeError("Cut Cross-Entropy needs a CUDA device")
    dtype = DTYPES[cfg["dtype"]]
    # drawn on the device: the 8B head's weight is half a billion values (seconds of host randn)
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"], generator=gen, device=device)
    weight = (torch.randn(cfg["vocab"], cfg["hidden"], generator=gen, device=device)
              * cfg["hidden"] ** -0.5)
    hidden = hidden.to(dtype).requires_grad_(True)
    weight = weight.to(dtype).requires_grad_(True)
    # the first cfg["prompt"] of each row is prompt and, with a prompt, ~1/16 is trailing padding
    seq = cfg["seq"]
    labels = masked_labels(cfg["batch"], seq, cfg["vocab"], prompt=int(cfg["prompt"] * seq),
                           pad=(0, max(1, seq // 16)) if cfg["prompt"] > 0 else 0).to(device)
    scored = labels != -100

    if impl.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        module = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False,
                                         compiled=impl == "liger_compiled")

        def loss_fn() -> torch.Tensor:
            out = module(weight, hidden, labels)
            return out[0] if isinstance(out, tuple) else out
    elif impl == "naive":
        def loss_fn() -> torch.Tensor:
            logp = (hidden @ weight.t()).float().log_softmax(-1)
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            return dpo_loss(torch.where(scored, picked, 0.0).sum(-1))
    elif impl == "fastpo":
        from fastpo.kernels.linear_logprobs import linear_sequence_logps

        chunks = {"chunk_tokens": cfg["chunk_tokens"], "chunk_vocab": cfg["chunk_vocab"]}

        def loss_fn() -> torch.Tensor:
            return dpo_loss(linear_sequence_logps(hidden, weight, labels, **chunks).logps)
    elif impl == "fastpo_loss_fused":
        from fastpo.engine.losses.modules import FusedLinearDPOLoss

        fused = FusedLinearDPOLoss(beta=BETA, use_ref_model=False, design="loss-fused")

        def loss_fn() -> torch.Tensor:
            return fused(weight, hidden, labels)[0]
    elif impl in CCE_IMPLS:
        from cut_cross_entropy import linear_cross_entropy

        filter_eps = cce_filter_eps(impl)

        def loss_fn() -> torch.Tensor:
            nll = linear_cross_entropy(hidden, weight, labels, reduction="none", shift=False,
                                       impl="cce", filter_eps=filter_eps)
            return dpo_loss(-torch.where(scored, nll.float(), 0.0).sum(-1))
    elif impl == "matmul":
        flat = hidden.detach().reshape(-1, cfg["hidden"])[scored.reshape(-1)].contiguous()
        w = weight.detach()

        def matmul() -> torch.Tensor:
            return (flat @ w.t())[0, 0].float()  # one element: no reduction in the timing

        return Workload(matmul, tokens=int(scored.sum()))
    else:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")

    def step() -> torch.Tensor:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, (hidden, weight))  # fresh gradient buffers every call
        del grads
        return loss.detach()

    return Workload(step, tokens=int(scored.sum()))


def worker(cfg: dict[str, Any]) -> None:
    torch.set_num_threads(cfg["threads"])
    measured = measure(build(cfg), device=cfg["device"], warmup=cfg["warmup"], reps=cfg["reps"])
    print(RESULT_MARKER + json.dumps({**cfg, **measured}), flush=True)


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.linear_logprobs", "--worker",
                           json.dumps(cfg)], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=worker_env(), check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
    return {**cfg, "error": f"exit {proc.returncode}: {tail}"[:400]}


def merge_rounds(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per implementation: times pooled over rounds, the largest peak memory."""
    good = [r for r in done if "error" not in r]
    if not good:
        return done[-1]
    times = [t for r in good for t in r["times_s"]]
    return {**good[-1], "times_s": times, "median_s": statistics.median(times),
            "min_s": min(times), "peak_mem_bytes": max(r["peak_mem_bytes"] for r in good),
            "rounds": len(good)}


def gradient_bytes(cfg: dict[str, Any]) -> int:
    """Bytes of the gradients every implementation returns: hidden states and weight."""
    elements = (cfg["batch"] * cfg["seq"] + cfg["vocab"]) * cfg["hidden"]
    return elements * DTYPES[cfg["dtype"]].itemsize


def tflops(row: dict[str, Any]) -> float:
    """Model TFLOP/s of a row (see the module docstring): 6·N·V·H per DPO step, 2·N·V·H per
    matmul, N the scored tokens."""
    per_token = (2 if row["impl"] == "matmul" else 6) * row["vocab"] * row["hidden"]
    return per_token * row["tokens_per_s"] / 1e12


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; "working" is the peak extra memory less the returned gradients."""
    base = next((r for r in rows if r["impl"] == "naive" and "error" not in r), None)
    yardstick = next((r for r in rows if r["impl"] == "matmul" and "error" not in r), None)
    lines = ["| impl | median s | min s | peak extra MB | working MB | time / naive | "
             "memory / naive | working / naive | TFLOP/s | % of matmul | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def working(r: dict[str, Any]) -> int:
        return max(r["peak_mem_bytes"] - gradient_bytes(r), 0)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | error: {r['error']} |||||||||||")
            continue
        step = r["impl"] != "matmul"
        mb = r["peak_mem_bytes"] / 2**20
        t_ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
        m_ratio = f"{r['peak_mem_bytes'] / max(base['peak_mem_bytes'], 1):.3f}" if base else "-"
        w_ratio = f"{working(r) / max(working(base), 1):.4f}" if base and step else "-"
        share = f"{100 * tflops(r) / tflops(yardstick):.0f}" if yardstick else "-"
        working_mb = f"{working(r) / 2**20:.0f}" if step else "-"
        loss = f"{r['check']:.6f}" if step else "-"
        lines.append(f"| {r['impl']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {mb:.0f} | "
                     f"{working_mb} | {t_ratio} | {m_ratio} | {w_ratio} | {tflops(r):.3f} | "
                     f"{share} | {loss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    for name in ("batch", "seq", "hidden", "vocab"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--impls", default=None, help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--prompt", type=float, default=0.25,
                        help="prompt fraction of each row (-100 labels); 0 scores every token")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat all implementations this many times, interleaved")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=0)
    parser.add_argument("--chunk-vocab", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    shape = dict(HEADLINE[args.device])
    for name in ("batch", "seq", "hidden", "vocab", "dtype", "impls"):
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    base = {"device": args.device, "prompt": args.prompt, "reps": args.reps,
            "warmup": args.warmup, "threads": args.threads, "chunk_tokens": args.chunk_tokens,
            "chunk_vocab": args.chunk_vocab, **{k: v for k, v in shape.items() if k != "impls"}}
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in shape["impls"].split(",")}
    for round_ in range(args.rounds):
        for impl, done in runs.items():
            row = run_one({**base, "impl": impl})
            done.append(row)
            status = row.get("error") or (f"{row['median_s']:.2f} s, "
                                          f"{row['peak_mem_bytes'] / 2**20:.0f} MB")
            print(f"round {round_ + 1} {impl}: {status}", flush=True)
    rows = [merge_rounds(done) for done in runs.values()]
    machine = machine_info()
    print(f"\n{machine['cpu']} ({machine['cpu_cores_available']} cores), torch "
          f"{machine['version_torch']}, {args.threads} threads; B{shape['batch']}×T{shape['seq']}"
          f", H{shape['hidden']}, V{shape['vocab']}, {shape['dtype']}, prompt {args.prompt}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
