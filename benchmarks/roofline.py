"""Roofline predictions of the fused linear op's designs at the anchor shapes (no GPU needed).

    python -m benchmarks.roofline            Markdown table for H100 and H200

The numbers come from ``fastpo.kernels.linear_logprobs_cost``, the same model the op's dispatcher
uses to choose a design per call; they are predictions from the data sheet's rates scaled by the
efficiencies (80 % of the bf16 peak for a GEMM, 90 % of HBM for a stream, until a GPU run measures
them: ``python -m benchmarks gpu`` prints its calibrated predictions beside its measurements), with
the tile kernels' L2 re-reads charged; not measurements.
Rows per shape and GPU: each design's forward (what a no-grad reference pass costs) and forward +
backward, the dispatcher's pick (``auto``: a design per phase), and the fused-linear losses'
``loss-fused`` design (forward + backward of a sequence-level loss, chunks of whole pairs of
``PAIR_TOKENS`` tokens). "% peak" divides the executed
matmul FLOPs by the time; "model %" divides the FLOPs of a step that keeps its logits (2·N·V·H
forward, 6·N·V·H forward + backward) — the TFLOP/s measure of ``benchmarks.linear_logprobs``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from fastpo.kernels import linear_logprobs_cost as lc

ANCHORS = (
    ("Llama-3-8B head × 32k", lc.Shape(32768, 4096, 128256)),
    ("Llama-3-8B head × 4k", lc.Shape(4096, 4096, 128256)),
    ("SmolLM2 head × 4k", lc.Shape(4096, 576, 49152)),
    ("70B head × 32k", lc.Shape(32768, 8192, 128256)),
)
PAIR_TOKENS = 2048  # a loss-fused chunk's unit: a pair of 1024-token sequences (the GPU suite's)


def _row(label: str, spec: lc.DeviceSpec, name: str, phase: str, c: lc.Cost) -> str:
    return (f"| {label} | {spec.name.split()[0]} | {name} | {phase} | {c.flops / 1e12:.1f} | "
            f"{c.hbm_bytes / 1e9:.1f} | {c.atomic_bytes / 1e9:.1f} | {c.l2_bytes / 1e9:.0f} | "
            f"{c.launches} | "
            f"{c.time_s * 1e3:.2f} | {c.pct_peak:.0f} | {c.model_pct_peak:.0f} | "
            f"{c.memory_bytes / 2**20:.0f} |")


def table(specs: tuple[lc.DeviceSpec, ...] = (lc.H100, lc.H200)) -> str:
    lines = ["| shape (bf16) | GPU | design | phase | TFLOP | HBM GB | atomic GB | L2 GB | "
             "launches | predicted ms | % peak | model % | working MiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, shape in ANCHORS:
        for spec in specs:
            for design in lc.DESIGNS:
                for phase in ("forward", "fwd+bwd"):
                    lines.append(_row(label, spec, design, phase,
                                      lc.predict(design, phase, shape, spec)))
            fwd, bwd, best = lc.best_plan(shape, spec)
            lines.append(_row(label, spec, f"**auto: {fwd} fwd + {bwd} bwd**", "fwd+bwd", best))
            paired = dataclasses.replace(shape, unit_tokens=PAIR_TOKENS)
            lines.append(_row(label, spec, f"**{lc.LOSS_FUSED}** (losses)", "fwd+bwd",
                              lc.predict(lc.LOSS_FUSED, "fwd+bwd", paired, spec)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(f"Predicted by the roofline of fastpo.kernels.linear_logprobs_cost (GEMM at "
          f"{lc.H100.gemm_efficiency:g}× and streams at {lc.H100.hbm_efficiency:g}× the data "
          f"sheet, atomics at {lc.ATOMIC_EFFICIENCY:g}× that bandwidth, L2 at "
          f"{lc.H100.l2_bytes_per_s / 1e12:g} TB/s, {lc.LAUNCH_S * 1e6:g} µs per launch, "
          f"gemm working budget {lc.GEMM_BUDGET_BYTES / 2**30:g} GiB); unmeasured.\n")
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
