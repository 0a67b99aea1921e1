"""The roofline arithmetic of the fused linear op's cost model: data sheets, a call, a cost.

The model is a roofline per kernel class: ``time = max(FLOPs / (e_gemm · peak), (bytes +
atomic bytes / ATOMIC_EFFICIENCY) / (e_hbm · HBM bandwidth), L2 bytes / L2 bandwidth) +
launches · LAUNCH_S``, summed over the kernels a design runs. A class of identical launches (every
GEMM of a phase, say) is charged as one kernel with the summed FLOPs and bytes, which is exact
when its launches share one regime (all compute-bound, all memory-bound) — the case at the anchor
shapes.

* **Efficiency.** No kernel reaches the data sheet: ``e_gemm`` is the share of the dense matmul
  peak a large cuBLAS GEMM of the call's dtype reaches, ``e_hbm`` the share of the HBM bandwidth a
  device-to-device copy reaches. Until measured they are the H100's usual figures
  (:data:`DEFAULT_GEMM_EFFICIENCY` ~80 % of spec GEMM, :data:`DEFAULT_HBM_EFFICIENCY` ~90 % of
  spec HBM); ``python -m benchmarks gpu`` measures both in the same run and writes a calibration
  (:class:`Calibration`) that :func:`device_spec` applies when ``FASTPO_COST_CALIBRATION`` names
  it, so that the dispatcher chooses with measured ceilings.
* **L2.** A tiled kernel re-reads each operand tile once per tile of the other operand (hidden
  rows once per vocab tile, weight rows once per token tile); what does not come from HBM comes
  from L2, charged at ``l2_bytes_per_s`` (an assumption of ~7 TB/s on H100/H200 SXM, from public
  microbenchmarks; not calibrated by the run). cuBLAS's re-reads are inside its measured ``e_gemm``
  and not charged again.

* **Atomics.** A fp32 ``atomic_add`` into a buffer far larger than L2 (``grad_h`` is N·H·4 bytes,
  ``grad_W`` V·H·4) misses L2: the sector is read from HBM, modified, written back. The kernels
  add contiguous rows of ``BLOCK_H`` floats, so sectors are used whole, and each 4 bytes added
  move 8 bytes of HBM traffic: atomics stream at ``ATOMIC_EFFICIENCY = 0.5`` of the HBM bandwidth.
  This ignores the serialization of the L2 atomic units, so it flatters the tile design.
* **Launch cost.** ``LAUNCH_S`` (4 µs) of GPU time per kernel launch.

The designs' costs are in ``linear_logprobs_cost``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

ATOMIC_EFFICIENCY = 0.5
LAUNCH_S = 4e-6
DEFAULT_GEMM_EFFICIENCY = 0.8  # a large bf16 cuBLAS GEMM on an H100, share of the dense peak
DEFAULT_HBM_EFFICIENCY = 0.9  # a device-to-device copy on an H100, share of the HBM bandwidth
CALIBRATION_ENV = "FASTPO_COST_CALIBRATION"  # path of a calibration JSON (python -m benchmarks gpu)


@dataclass(frozen=True)
class DeviceSpec:
    """Data-sheet rates of a GPU (dense, no sparsity) and the shares of them that are reached."""

    name: str
    half_flops: float  # bf16 / fp16 tensor cores, FLOP/s
    tf32_flops: float
    fp32_flops: float  # fp32 without tensor cores (torch's default for fp32 matmuls)
    hbm_bytes_per_s: float
    sms: int
    l2_bytes_per_s: float = 7e12
    gemm_efficiency: float = DEFAULT_GEMM_EFFICIENCY
    hbm_efficiency: float = DEFAULT_HBM_EFFICIENCY
    calibrated: str = ""  # where the efficiencies were measured ("" = defaults)

    def matmul_flops(self, dtype_bytes: int, tf32: bool = False) -> float:
        if dtype_bytes == 2:
            return self.half_flops
        return self.tf32_flops if tf32 else self.fp32_flops

    @property
    def bandwidth(self) -> float:
        """The HBM bandwidth a streaming kernel reaches: ``e_hbm`` · data sheet."""
        return self.hbm_efficiency * self.hbm_bytes_per_s


H100 = DeviceSpec("H100 SXM", 989e12, 494.5e12, 67e12, 3.35e12, 132)
H200 = DeviceSpec("H200 SXM", 989e12, 494.5e12, 67e12, 4.8e12, 132)


@dataclass(frozen=True)
class Calibration:
    """Efficiencies measured on one device (``python -m benchmarks gpu`` writes them): the share
    of the dense bf16 matmul peak a large GEMM reached and the share of the HBM bandwidth a
    device-to-device copy reached, in the same run."""

    device: str
    gemm_efficiency: float
    hbm_efficiency: float
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("gemm_efficiency", "hbm_efficiency"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or \
                    not math.isfinite(value) or not 0 < value <= 1.5:
                raise ValueError(f"calibration {name} must be a number in (0, 1.5] (a share of "
                                 f"the data sheet), got {value!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"calibration device must be a device name, got {self.device!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration JSON; a clear ValueError naming the file and field if it is bad."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cost-model calibration {path}: cannot read it ({exc})") from exc
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - fields or \
                not {"device", "gemm_efficiency", "hbm_efficiency"} <= set(data):
            got = sorted(data) if isinstance(data, dict) else data
            raise ValueError(f"cost-model calibration {path}: expected an object with fields "
                             f"{sorted(fields)}, got {got!r}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"cost-model calibration {path}: {exc}") from exc


def calibrated(spec: DeviceSpec, calibration: Calibration) -> DeviceSpec:
    """``spec`` with the measured efficiencies of ``calibration``."""
    return dataclasses.replace(spec, gemm_efficiency=calibration.gemm_efficiency,
                               hbm_efficiency=calibration.hbm_efficiency,
                               calibrated=calibration.source or calibration.device)


def data_sheet(name: str | None) -> DeviceSpec:
    """The uncalibrated spec of a device name (H100 for anything unknown)."""
    text = (name or "").lower()
    return H200 if "h200" in text else H100


@functools.lru_cache(maxsize=16)
def device_spec(name: str | None) -> DeviceSpec:
    """The spec of a device name (``torch.cuda.get_device_name``; H100 for anything unknown),
    with the calibration that ``FASTPO_COST_CALIBRATION`` names applied when it was measured on a
    device of that name. Read once per process and name (the dispatcher calls this per call)."""
    spec = data_sheet(name)
    path = os.environ.get(CALIBRATION_ENV)
    if path:
        calibration = Calibration.load(path)
        if name and calibration.device == name:
            spec = calibrated(spec, calibration)
    return spec


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
    l2_bytes: float = 0.0  # tile re-reads served by L2 (not HBM)
    launches: int = 0
    time_s: float = 0.0
    memory_bytes: float = 0.0  # working memory beyond inputs and returned gradients
    peak_flops: float = field(default=0.0, repr=False)

    def kernel(self, spec: DeviceSpec, *, flops: float = 0.0, nbytes: float = 0.0,
               atomic_bytes: float = 0.0, l2_bytes: float = 0.0, launches: int = 1) -> None:
        """Charge a class of ``launches`` kernels with these summed FLOPs and bytes."""
        memory_s = (nbytes + atomic_bytes / ATOMIC_EFFICIENCY) / spec.bandwidth
        compute_s = flops / (spec.gemm_efficiency * self.peak_flops) if flops else 0.0
        self.time_s += max(compute_s, memory_s, l2_bytes / spec.l2_bytes_per_s)
        self.time_s += launches * LAUNCH_S
        self.flops += flops
        self.hbm_bytes += nbytes
        self.atomic_bytes += atomic_bytes
        self.l2_bytes += l2_bytes
        self.launches += launches

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.design, "fwd+bwd", self.flops + other.flops,
                    self.model_flops + other.model_flops, self.hbm_bytes + other.hbm_bytes,
                    self.atomic_bytes + other.atomic_bytes, self.l2_bytes + other.l2_bytes,
                    self.launches + other.launches, self.time_s + other.time_s,
                    max(self.memory_bytes, other.memory_bytes), self.peak_flops)

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
