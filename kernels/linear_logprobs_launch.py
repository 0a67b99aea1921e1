"""Launch configurations of the fused linear op's Triton kernels (``linear_logprobs_triton``).

One table per kernel, operand class and GPU architecture, read by the launchers and by the compile
gates of ``benchmarks/compile_report.py`` (which compile exactly these), plus the operand dtype and
precision of ``tl.dot`` and the interpreter's small tiles on CPU.
"""

from __future__ import annotations

import torch


def interpreting(device: torch.device) -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors)."""
    return device.type == "cpu"


# Launch configurations (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) per kernel, operand
# class and architecture (80: sm_80 and other pre-Hopper GPUs; 90: sm_90 and later), chosen so
# that every variant compiles without spilling (0 B stack / local, held by the compile gates of
# ``benchmarks/compile_report.py``, which compiles exactly these) and keeps wgmma on sm_90:
# - "fp32" (IEEE, FMA dot): 64×64 tiles at BLOCK_H 16, 8 warps. At BLOCK_H 32 or 4 warps the
#   fp32 operand tiles do not fit beside the dlogits tile (the backward spilled ~4.5 KB).
# - "half" (bf16/fp16) backward on sm_80: mma.sync keeps all accumulators in registers; 128×128
#   tiles at BLOCK_H 32 over 16 warps (128 registers each; at 8 warps 255 registers and a spill
#   at BLOCK_H 64). The 128×128 tile is kept because the atomic traffic grows as its inverse.
# - sm_90 half: 128×128 tiles on wgmma; BLOCK_H 64 in the forward, 32 in the backward (207
#   registers instead of 254 at the cap, and 99 KB of shared memory instead of 165 KB).
# The tile shapes on sm_90 are those of the cost model (``linear_logprobs_cost.TILE_BLOCK_N/V``).
_CONFIGS: dict[tuple[str, str, int], tuple[int, int, int, int, int]] = {
    ("forward", "fp32", 80): (64, 64, 16, 8, 2),
    ("forward", "fp32", 90): (64, 64, 16, 8, 2),
    ("backward", "fp32", 80): (64, 64, 16, 8, 2),
    ("backward", "fp32", 90): (64, 64, 16, 8, 2),
    ("forward", "tf32", 80): (64, 64, 32, 4, 3),
    ("forward", "tf32", 90): (64, 64, 32, 4, 3),
    ("backward", "tf32", 80): (64, 64, 16, 4, 3),
    ("backward", "tf32", 90): (64, 64, 32, 4, 3),
    ("forward", "half", 80): (128, 128, 32, 8, 3),
    ("forward", "half", 90): (128, 128, 64, 8, 3),
    ("backward", "half", 80): (128, 128, 32, 16, 2),
    ("backward", "half", 90): (128, 128, 32, 8, 3),
}
# the soft-capped kernels where they differ: the sm_90 half backward with tanh and its slope on
# the tile spilled 8 B at BLOCK_H 32 (255 registers, at 2 or 3 stages); BLOCK_H 16 fits (232)
_SOFTCAP_CONFIGS: dict[tuple[str, str, int], tuple[int, int, int, int, int]] = {
    ("backward", "half", 90): (128, 128, 16, 8, 3),
}
_INTERPRETER_CONFIG = (16, 32, 16, 1, 1)  # small tiles: the interpreter runs them with numpy


def arch_of(capability: tuple[int, int]) -> int:
    """The configuration family of a CUDA compute capability: 90 from Hopper on, else 80."""
    return 90 if capability[0] >= 9 else 80


def launch_config(kernel: str, dot: torch.dtype, precision: str,
                  arch: int, softcap: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) of ``kernel`` ("forward" or
    "backward") for ``tl.dot`` operands of dtype ``dot`` at ``precision`` ("ieee" or "tf32") on
    the architecture family ``arch`` (80 or 90, see :func:`arch_of`); ``softcap``: the
    ``HAS_SOFTCAP`` variant. The launchers and the compile gates both read it."""
    if dot == torch.float32:
        family = "tf32" if precision == "tf32" else "fp32"
    elif dot in (torch.bfloat16, torch.float16):
        family = "half"
    else:
        raise ValueError(f"no launch configuration for tl.dot operands of dtype {dot}")
    key = (kernel, family, arch_of((arch // 10, arch % 10)))
    return _SOFTCAP_CONFIGS.get(key, _CONFIGS[key]) if softcap else _CONFIGS[key]


def blocks(device: torch.device, dot: torch.dtype, kernel: str,
            softcap: bool = False) -> tuple[int, int, int, int, int]:
    """The launch configuration of ``kernel`` on ``device`` (its compute capability, read at
    launch; the interpreter's small tiles on CPU)."""
    if interpreting(device):
        return _INTERPRETER_CONFIG
    arch = arch_of(torch.cuda.get_device_capability(device))
    return launch_config(kernel, dot, precision_of(dot), arch, softcap)


def dot_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Operand dtype of ``tl.dot``: the inputs' common dtype on a GPU (bf16 tensor cores for bf16).

    Under the interpreter the operands are fp32: its bf16/fp16 ``tl.dot`` returns garbage (Triton
    3.9), so there the half-precision inputs are checked through exact fp32 upcasts.
    """
    if interpreting(hidden.device):
        return torch.float32
    return torch.promote_types(hidden.dtype, weight.dtype)


def precision_of(dot: torch.dtype) -> str:
    """``tl.dot``'s input precision: "tf32" for fp32 operands where torch allows TF32."""
    if dot == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
