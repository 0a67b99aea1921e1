"""The roofline arithmetic of the fused linear op's cost model: data sheets, a call, a cost.

The model is a roofline per kernel class: ``time = max(FLOPs / peak, bytes / HBM bandwidth +
atomic bytes / (ATOMIC_EFFICIENCY · HBM bandwidth)) + launches · LAUNCH_S``, summed over the
kernels a design runs. A class of identical launches (every GEMM of a phase, say) is charged as
one kernel with the summed FLOPs and bytes, which is exact when its launches share one regime
(all compute-bound, all memory-bound) — the case at the anchor shapes. Peak rates are the data
sheet's; no kernel reaches them, so the predicted times are lower bounds and the percentages upper
bounds. Efficiency below the roofline (cuBLAS ~80-90 % of dense peak on large bf16 GEMMs, a Triton
fused dot kernel usually less) is not modelled: it needs a GPU to calibrate.

* **Atomics.** A fp32 ``atomic_add`` into a buffer far larger than L2 (``grad_h`` is N·H·4 bytes,
  ``grad_W`` V·H·4) misses L2: the sector is read from HBM, modified, written back. The kernels
  add contiguous rows of ``BLOCK_H`` floats, so sectors are used whole, and each 4 bytes added
  move 8 bytes of HBM traffic: atomics stream at ``ATOMIC_EFFICIENCY = 0.5`` of the HBM bandwidth.
  This ignores the serialization of the L2 atomic units, so it flatters the tile design.
* **Launch cost.** ``LAUNCH_S`` (4 µs) of GPU time per kernel launch.

The designs' costs are in ``linear_logprobs_cost``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATOMIC_EFFICIENCY = 0.5
LAUNCH_S = 4e-6


@dataclass(frozen=True)
class DeviceSpec:
    """Data-sheet rates of a GPU (dense, no sparsity)."""

    name: str
    half_flops: float  # bf16 / fp16 tensor cores, FLOP/s
    tf32_flops: float
    fp32_flops: float  # fp32 without tensor cores (torch's default for fp32 matmuls)
    hbm_bytes_per_s: float
    sms: int

    def matmul_flops(self, dtype_bytes: int, tf32: bool = False) -> float:
        if dtype_bytes == 2:
            return self.half_flops
        return self.tf32_flops if tf32 else self.fp32_flops


H100 = DeviceSpec("H100 SXM", 989e12, 494.5e12, 67e12, 3.35e12, 132)
H200 = DeviceSpec("H200 SXM", 989e12, 494.5e12, 67e12, 4.8e12, 132)


def device_spec(name: str | None) -> DeviceSpec:
    """The spec of a device name (``torch.cuda.get_device_name``); H100 for anything unknown."""
    text = (name or "").lower()
    return H200 if "h200" in text else H100


@dataclass(frozen=True)
class Shape:
    """One call: ``tokens`` rows (N, scored or not), hidden size, vocabulary, operand bytes (2
    bf16/fp16, 4 fp32), which gradients are needed, whether fp32 matmuls may use TF32, and
    ``scored``: the number of scored rows when the host knows it (None: unknown);
    ``unit_tokens``: the tokens of the smallest piece a loss-fused chunk may hold (a pair of
    sequences for a paired loss; 0: any number of tokens)."""

    tokens: int
    hidden: int
    vocab: int
    dtype_bytes: int = 2
    bias: bool = False
    need_hidden: bool = True
    need_weight: bool = True
    tf32: bool = False
    scored: int | None = None
    unit_tokens: int = 0

    @property
    def rows(self) -> int:
        """Rows a design is charged for: the scored ones when known, else all N."""
        return self.tokens if self.scored is None else self.scored

    @property
    def compact(self) -> bool:
        """Whether the gemm design gathers the scored rows (their count is known)."""
        return self.scored is not None


@dataclass
class Cost:
    """Predicted cost of one design and phase."""

    design: str
    phase: str
    flops: float = 0.0  # executed matmul FLOPs
    model_flops: float = 0.0  # 2·N·V·H forward, 6·N·V·H forward + backward
    hbm_bytes: float = 0.0
    atomic_bytes: float = 0.0
    launches: int = 0
    time_s: float = 0.0
    memory_bytes: float = 0.0  # working memory beyond inputs and returned gradients
    peak_flops: float = field(default=0.0, repr=False)

    def kernel(self, spec: DeviceSpec, *, flops: float = 0.0, nbytes: float = 0.0,
               atomic_bytes: float = 0.0, launches: int = 1, rate: float | None = None) -> None:
        """Charge a class of ``launches`` kernels with these summed FLOPs and bytes."""
        rate = rate or self.peak_flops
        memory_s = (nbytes + atomic_bytes / ATOMIC_EFFICIENCY) / spec.hbm_bytes_per_s
        self.time_s += max(flops / rate, memory_s) + launches * LAUNCH_S
        self.flops += flops
        self.hbm_bytes += nbytes
        self.atomic_bytes += atomic_bytes
        self.launches += launches

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.design, "fwd+bwd", self.flops + other.flops,
                    self.model_flops + other.model_flops, self.hbm_bytes + other.hbm_bytes,
                    self.atomic_bytes + other.atomic_bytes, self.launches + other.launches,
                    self.time_s + other.time_s, max(self.memory_bytes, other.memory_bytes),
                    self.peak_flops)

    @property
    def pct_peak(self) -> float:
        """Executed FLOP rate as a percentage of the matmul peak (how GEMM-bound the design is)."""
        return 100.0 * self.flops / self.time_s / self.peak_flops if self.time_s else 0.0

    @property
    def model_pct_peak(self) -> float:
        """Model FLOP rate (2 or 6·N·V·H per time) as a percentage of the matmul peak."""
        return 100.0 * self.model_flops / self.time_s / self.peak_flops if self.time_s else 0.0


def new_cost(design: str, phase: str, shape: Shape, spec: DeviceSpec) -> Cost:
    """An empty cost of ``design`` for ``phase`` with its model FLOPs: 2·N·V·H for the forward,
    4·N·V·H for the backward."""
    cost = Cost(design, phase, peak_flops=spec.matmul_flops(shape.dtype_bytes, shape.tf32))
    nvh = shape.rows * shape.vocab * shape.hidden
    cost.model_flops = 2.0 * nvh if phase == "forward" else 4.0 * nvh
    return cost
