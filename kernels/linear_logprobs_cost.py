"""Roofline cost model of the fused linear logprob op: which design, at what predicted speed.

Two designs compute ``logp_n = z[n, y_n] − logsumexp(z[n])`` with ``z = (h Wᵀ + b) / T`` and its
gradients without the ``[N, V]`` logits (a third, loss-fused, computes a loss and its gradients):

    tile   Triton kernels of ``linear_logprobs_triton.py``. Forward: one fused kernel builds each
           ``BLOCK_N × BLOCK_V`` logit tile in registers and keeps an online log-sum-exp (nothing
           of size N·V touches memory). Backward: one kernel recomputes each tile and adds its
           shares of ``grad_h`` and ``grad_W`` with fp32 atomics.
    gemm   ``linear_logprobs_gemm.py``: token chunks × vocab slices whose logits come from one
           cuBLAS GEMM into an fp32 buffer, a row kernel (log-sum-exp; in the backward the softmax
           gradient), then ``grad_h`` and ``grad_W`` as GEMMs accumulating in fp32. No atomics.
    loss-fused  ``linear_logprobs_loss_fused.py``, not a design of the op but of the fused-linear
           preference losses: chunks of whole sequences (pairs), each chunk's ``[C, V]`` logits by
           one GEMM, kept while a caller-supplied loss of the chunk's sequence log-probs gives
           dL/dπ; then the softmax gradient in place and ``grad_h``, ``grad_W`` by GEMMs, all in
           the forward. The backward only scales the stored gradients.

The roofline arithmetic (``time = max(FLOPs / peak, bytes / bandwidth) + launches · 4 µs`` per
kernel class, atomics at half the bandwidth) is that of ``linear_logprobs_roofline``.

Assumptions, stated once:

* **L2 reuse in the tile kernels.** Programs run token tiles fastest, so the ~``sms`` programs in
  flight share the weight tiles they stream: the weight crosses HBM ``ceil(token tiles / sms)``
  times per pass. Every program reloads its hidden rows for each vocab tile and its weight rows
  for each token tile (the K loop of ``_logit_tile``): what of that does not cross HBM is L2
  traffic, charged at the spec's L2 bandwidth (:func:`tile_l2_bytes`); at the 8B head × 32k
  tokens it is ~0.5 TB per matmul pass, more than the matmul's time at 80 % of peak.
* **FLOPs.** Executed FLOPs count only matmul work (2 per multiply-add); the exp/log of the row
  kernels is charged as memory traffic, which bounds it. "Model" FLOPs are those of a training
  step that keeps its logits, 2·N·V·H forward, 6·N·V·H forward + backward — the numerator of every
  TFLOP/s figure of the benchmarks. Both designs recompute the logits in the backward (the
  upstream gradient is not known in the forward, and keeping the logits is what is avoided), so
  forward + backward executes 8·N·V·H: at best 75 % of peak in model FLOPs. The loss-fused design
  knows the gradient while a chunk's logits are held: it executes 6·N·V·H (cap 100 %).

* **Rows.** A call has N token rows, some ignored (prompt, padding). Their count is a device
  value; the host knows it only when the caller passes it (the op's ``num_scored`` hint,
  ``Shape.scored``). Without it the gemm design computes every row (its loops are sized on the
  host; the ignored rows come out zero) and is charged for all N; with it the gemm design
  compacts the scored rows (a gather per chunk) and is charged for those only. The tile kernels
  always skip ignored rows on the device, but with the count unknown they are charged for N too
  (an upper bound; their idle programs cost nothing). Model FLOPs count the rows charged.

The op's dispatcher (``linear_logprobs``) calls :func:`choose_design` per call and phase with the
call's N, its ``num_scored`` hint (if any), H, V, dtype and device; the benchmark
``python -m benchmarks.roofline`` prints the same numbers at the anchor shapes.
"""

from __future__ import annotations

import functools
import math

from .linear_logprobs_roofline import (
    ATOMIC_EFFICIENCY,
    H100,
    H200,
    LAUNCH_S,
    Cost,
    DeviceSpec,
    Shape,
    device_spec,
    new_cost,
)

__all__ = ["ATOMIC_EFFICIENCY", "H100", "H200", "LAUNCH_S", "Cost", "DeviceSpec", "Shape",
           "device_spec"]

GEMM_BUDGET_BYTES = 2**30  # working memory of the gemm design beyond the returned gradients
DESIGNS = ("tile", "gemm")  # the op's designs, chosen per call and phase by the dispatcher
LOSS_FUSED = "loss-fused"  # the fused-linear losses' design (a loss inside the op)
# small kernels per loss-fused chunk beyond its GEMMs and row passes: the per-sequence sums, the
# caller's chunk loss and its autograd gradient, the per-token upstream gradient, the loss sum
# (the sigmoid DPO loss with its NLL term fits: tests/engine/losses/test_fused_linear_designs.py)
CHUNK_LOSS_LAUNCHES = 64
PHASES = ("forward", "backward", "fwd+bwd")
# Tile shapes of the Triton kernels on sm_90 (``linear_logprobs_launch.launch_config``; a test
# holds the two together), by operand bytes.
TILE_BLOCK_N = {2: 128, 4: 64}
TILE_BLOCK_V = {2: 128, 4: 64}
TILE_WEIGHT_GRAD_CHUNK_BYTES = 256 * 2**20  # fp32 grad_W rows per backward launch (half weights)


# --------------------------------------------------------------------------- tile design


def _tile_blocks(shape: Shape) -> tuple[int, int]:
    return TILE_BLOCK_N[shape.dtype_bytes], TILE_BLOCK_V[shape.dtype_bytes]


def tile_l2_bytes(shape: Shape, spec: DeviceSpec) -> float:
    """Bytes one matmul pass of a tile kernel reads from L2: each token tile's hidden rows once
    per vocab tile, each vocab tile's weight rows once per token tile, less what crosses HBM
    (the hidden rows once, the weight ``ceil(token tiles / sms)`` times)."""
    n, h, v, e = shape.rows, shape.hidden, shape.vocab, shape.dtype_bytes
    block_n, block_v = _tile_blocks(shape)
    n_tiles, v_tiles = math.ceil(n / block_n), math.ceil(v / block_v)
    weight_passes = math.ceil(n_tiles / spec.sms)
    return float(n * h * e * (v_tiles - 1) + v * h * e * (n_tiles - weight_passes))


def tile_forward(shape: Shape, spec: DeviceSpec) -> Cost:
    n, h, v, e = shape.rows, shape.hidden, shape.vocab, shape.dtype_bytes
    cost = new_cost("tile", "forward", shape, spec)
    block_n, block_v = _tile_blocks(shape)
    n_tiles, v_tiles = math.ceil(n / block_n), math.ceil(v / block_v)
    splits = max(1, min(v_tiles, math.ceil(2 * spec.sms / max(n_tiles, 1))))
    weight_passes = math.ceil(n_tiles / spec.sms)
    cost.kernel(spec, nbytes=shape.tokens * 16, launches=4)  # scored order (sort) and count
    cost.kernel(spec, flops=2.0 * n * v * h, l2_bytes=tile_l2_bytes(shape, spec),
                nbytes=n * h * e + weight_passes * v * h * e + 3 * 4 * splits * n)
    cost.kernel(spec, nbytes=3 * 4 * splits * n + 8 * n * 4, launches=8)  # combine the splits
    cost.memory_bytes = 3 * 4 * splits * n + 16 * n
    return cost


def tile_backward(shape: Shape, spec: DeviceSpec) -> Cost:
    n, h, v, e = shape.rows, shape.hidden, shape.vocab, shape.dtype_bytes
    cost = new_cost("tile", "backward", shape, spec)
    block_n, block_v = _tile_blocks(shape)
    n_tiles, v_tiles = math.ceil(n / block_n), math.ceil(v / block_v)
    half_weight = e != 4
    chunk = v
    if half_weight:
        chunk = max(1, min(v, TILE_WEIGHT_GRAD_CHUNK_BYTES // (4 * h)))
    launches = math.ceil(v / chunk)
    weight_passes = math.ceil(n_tiles / spec.sms)
    matmuls = 1 + shape.need_hidden + shape.need_weight
    atomics = 0.0
    if shape.need_hidden:
        atomics += 4.0 * n * h * v_tiles  # every vocab tile adds its share of each grad_h row
    if shape.need_weight:
        atomics += 4.0 * v * h * n_tiles  # every token tile adds its share of each grad_W row
    if shape.bias:
        atomics += 4.0 * v * n_tiles
    cost.kernel(spec, nbytes=shape.tokens * 16, launches=4)  # scored order and count
    cost.kernel(spec, nbytes=4.0 * n * h * shape.need_hidden, launches=1)  # zero grad_h
    cost.kernel(spec, flops=2.0 * matmuls * n * v * h, launches=launches,
                nbytes=matmuls * (n * h * e + weight_passes * v * h * e), atomic_bytes=atomics,
                l2_bytes=matmuls * tile_l2_bytes(shape, spec))
    if shape.need_weight and half_weight:  # zero the fp32 chunk, cast it into grad_W
        cost.kernel(spec, nbytes=v * h * (4 + 4 + e), launches=2 * launches)
    if shape.need_hidden:
        cost.kernel(spec, nbytes=n * h * (4 + e))  # grad_h fp32 -> input dtype
    cost.memory_bytes = (4.0 * n * h * shape.need_hidden
                         + 4.0 * chunk * h * (shape.need_weight and half_weight))
    return cost


# --------------------------------------------------------------------------- gemm design


def gemm_memory(tokens: int, hidden: int, vocab: int, dtype_bytes: int, chunk_tokens: int,
                chunk_vocab: int, *, need_hidden: bool = True, need_weight: bool = True,
                softcap: bool = False) -> int:
    """Working bytes of the gemm design's backward (its forward needs less) beyond the inputs and
    the returned gradients: the fp32 logits tile, its gradient in the operand dtype (in place for
    fp32 unless ``softcap``: the capped backward keeps the tile for dz/dL), a gathered hidden
    chunk, the fp32 grad_h rows and a slice's fp32 grad_W accumulator (half-precision weights),
    and per-row vectors."""
    tile = chunk_tokens * chunk_vocab
    grad_tile = 0 if dtype_bytes == 4 and not softcap else tile * dtype_bytes
    acc_w = 4 * chunk_vocab * hidden if need_weight and dtype_bytes != 4 else 0
    acc_h = 4 * tokens * hidden if need_hidden else 0
    return 4 * tile + grad_tile + chunk_tokens * hidden * dtype_bytes + acc_h + acc_w + 48 * tokens


@functools.lru_cache(maxsize=256)
def gemm_plan(tokens: int, hidden: int, vocab: int, dtype_bytes: int, *,
              need_hidden: bool = True, need_weight: bool = True,
              budget_bytes: int = GEMM_BUDGET_BYTES, spec: DeviceSpec = H100,
              softcap: bool = False) -> tuple[int, int]:
    """(chunk_tokens, chunk_vocab) of the gemm design: among power-of-two tiles (16..8192 tokens,
    128..16384 vocab entries, clamped to the shape) whose working memory (:func:`gemm_memory`)
    fits the budget, the one with the smallest predicted time (ties: the larger tile).

    The fp32 grad_h rows (4·N·H bytes) do not shrink with the tile; when they take more than half
    the budget, the budget becomes those rows plus half the budget.
    """
    tokens, vocab = max(tokens, 1), max(vocab, 1)
    floor = 4 * tokens * hidden if need_hidden else 0
    budget = max(budget_bytes, floor + budget_bytes // 2)
    token_options = sorted({min(tokens, 2**k) for k in range(4, 14)}, reverse=True)
    vocab_options = sorted({min(vocab, 2**k) for k in range(7, 15)}, reverse=True)
    shape = Shape(tokens, hidden, vocab, dtype_bytes, need_hidden=need_hidden,
                  need_weight=need_weight)
    backward = need_hidden or need_weight
    best, best_key = (token_options[-1], vocab_options[-1]), None
    for c in token_options:
        for s in vocab_options:
            mem = gemm_memory(tokens, hidden, vocab, dtype_bytes, c, s, need_hidden=need_hidden,
                              need_weight=need_weight, softcap=softcap)
            if mem > budget:
                continue
            cost = (gemm_backward if backward else gemm_forward)(shape, spec, plan=(c, s))
            key = (round(cost.time_s, 9), -c * s, -c)
            if best_key is None or key < best_key:
                best, best_key = (c, s), key
    return best


def gemm_forward(shape: Shape, spec: DeviceSpec, plan: tuple[int, int] | None = None) -> Cost:
    n, h, v, e = shape.rows, shape.hidden, shape.vocab, shape.dtype_bytes
    cost = new_cost("gemm", "forward", shape, spec)
    c, s = plan or gemm_plan(n, h, v, e, need_hidden=False, need_weight=False, spec=spec)
    chunks, slices = math.ceil(n / c), math.ceil(v / s)
    tiles = chunks * slices
    cost.kernel(spec, nbytes=shape.tokens * 24, launches=4)  # labels, output buffers
    if shape.compact:  # the scored rows: nonzero_static, then a gather per chunk
        cost.kernel(spec, nbytes=shape.tokens * 16 + 2 * n * h * e, launches=2 + 2 * chunks)
    cost.kernel(spec, flops=2.0 * n * v * h, launches=tiles,
                nbytes=slices * n * h * e + chunks * v * h * e + 4.0 * n * v)
    if shape.bias:
        cost.kernel(spec, nbytes=8.0 * n * v, launches=tiles)
    cost.kernel(spec, nbytes=4.0 * n * v, launches=tiles)  # row log-sum-exp
    # per tile: the label's column and logit, the running lse (small elementwise kernels)
    cost.kernel(spec, nbytes=tiles * c * 40, launches=9 * tiles)
    cost.kernel(spec, nbytes=n * 40, launches=10 * chunks)  # per chunk: init, select, store rows
    cost.memory_bytes = 4 * c * s + c * h * e + 40 * n
    return cost


def gemm_backward(shape: Shape, spec: DeviceSpec, plan: tuple[int, int] | None = None) -> Cost:
    n, h, v, e = shape.rows, shape.hidden, shape.vocab, shape.dtype_bytes
    cost = new_cost("gemm", "backward", shape, spec)
    c, s = plan or gemm_plan(n, h, v, e, need_hidden=shape.need_hidden,
                             need_weight=shape.need_weight, spec=spec)
    chunks, slices = math.ceil(n / c), math.ceil(v / s)
    tiles = chunks * slices
    nvh = float(n) * v * h
    cost.kernel(spec, nbytes=shape.tokens * 48, launches=8)  # scored rows, per-row vectors
    cost.kernel(spec, nbytes=4.0 * n * h * shape.need_hidden, launches=1)  # zero grad_h rows
    if shape.compact or shape.need_weight:  # a copy of each hidden chunk: the scored rows
        # gathered, or every row with the ignored ones zeroed for the grad_W GEMM
        cost.kernel(spec, nbytes=2 * slices * n * h * e, launches=tiles)
    cost.kernel(spec, flops=2 * nvh, launches=tiles,  # recompute the logits
                nbytes=slices * n * h * e + chunks * v * h * e + 4.0 * n * v)
    if shape.bias:
        cost.kernel(spec, nbytes=8.0 * n * v, launches=tiles)
    cost.kernel(spec, nbytes=(4.0 + e) * n * v + tiles * c * 32, launches=4 * tiles)  # dlogits
    if shape.need_hidden:  # grad_h[c] += G @ W_s, fp32 accumulator read and written
        cost.kernel(spec, flops=2 * nvh, launches=tiles,
                    nbytes=e * n * v + chunks * v * h * e + 8.0 * slices * n * h)
        cost.kernel(spec, nbytes=n * h * (4 + e) * 2, launches=2)  # cast, scatter rows
    if shape.need_weight:  # grad_W[s] += Gᵀ @ h_c in fp32, cast once per slice
        cost.kernel(spec, flops=2 * nvh, launches=tiles,
                    nbytes=e * n * v + slices * n * h * e + 8.0 * chunks * v * h)
        cost.kernel(spec, nbytes=v * h * (4 + 4 + e), launches=2 * slices)
    if shape.bias:
        cost.kernel(spec, nbytes=e * n * v, launches=tiles)
    cost.memory_bytes = gemm_memory(n, h, v, e, c, s, need_hidden=shape.need_hidden,
                                    need_weight=shape.need_weight)
    return cost


# --------------------------------------------------------------------------- loss-fused design


def loss_fused_memory(tokens: int, hidden: int, vocab: int, dtype_bytes: int, chunk_tokens: int,
                      *, need_hidden: bool = True, need_weight: bool = True) -> int:
    """Working bytes of the loss-fused design beyond the inputs and the returned gradients: the
    fp32 ``[C, V]`` logits tile, the softmax gradient in the operand dtype (in place for fp32),
    the masked hidden chunk, the chunk's fp32 grad_h rows, the whole fp32 grad_W accumulator
    (half-precision weights; an fp32 weight accumulates in its returned gradient), per-token
    vectors."""
    c = chunk_tokens
    grad_tile = 0 if dtype_bytes == 4 else c * vocab * dtype_bytes
    acc_w = 4 * vocab * hidden if need_weight and dtype_bytes != 4 else 0
    acc_h = 4 * c * hidden if need_hidden else 0
    return 4 * c * vocab + grad_tile + c * hidden * dtype_bytes + acc_h + acc_w + 32 * tokens


@functools.lru_cache(maxsize=256)
def loss_fused_plan(tokens: int, hidden: int, vocab: int, dtype_bytes: int, unit_tokens: int, *,
                    need_hidden: bool = True, need_weight: bool = True,
                    budget_bytes: int = GEMM_BUDGET_BYTES) -> int:
    """Units (pairs or sequences of ``unit_tokens`` tokens) per chunk of the loss-fused design:
    the most whose working memory (:func:`loss_fused_memory`) fits the budget, at least one (a
    unit's logits are needed whole, whatever the budget). The fp32 grad_W accumulator does not
    shrink with the chunk; when it takes more than half the budget, the budget becomes it plus
    half the budget (the rule of :func:`gemm_plan`)."""
    unit, tokens = max(unit_tokens, 1), max(tokens, 1)
    units = math.ceil(tokens / unit)

    def memory(k: int) -> int:
        return loss_fused_memory(tokens, hidden, vocab, dtype_bytes, min(k * unit, tokens),
                                 need_hidden=need_hidden, need_weight=need_weight)

    fixed = memory(0)
    budget = max(budget_bytes, fixed + budget_bytes // 2)
    per_unit = max(memory(1) - fixed, 1)
    return max(1, min(units, (budget - fixed) // per_unit))


def loss_fused_forward(shape: Shape, spec: DeviceSpec, plan: int | None = None) -> Cost:
    """The loss-fused forward: every matmul of the step (6·N·V·H), the loss, the gradients."""
    n, h, v, e = shape.rows, shape.hidden, shape.vocab, shape.dtype_bytes
    cost = new_cost(LOSS_FUSED, "forward", shape, spec)
    unit = max(shape.unit_tokens, 1)
    k = plan or loss_fused_plan(n, h, v, e, unit, need_hidden=shape.need_hidden,
                                need_weight=shape.need_weight)
    c = min(k * unit, n)
    chunks = math.ceil(n / c)
    nvh = float(n) * v * h
    cost.kernel(spec, nbytes=shape.tokens * 32, launches=6)  # labels, counts, output buffers
    cost.kernel(spec, nbytes=n * h * (3 * e + 1), launches=3 * chunks)  # hidden chunk, masked
    cost.kernel(spec, flops=2 * nvh, launches=chunks,  # the chunk's logits, whole vocabulary
                nbytes=n * h * e + chunks * v * h * e + 4.0 * n * v)
    if shape.bias:
        cost.kernel(spec, nbytes=8.0 * n * v, launches=chunks)
    cost.kernel(spec, nbytes=4.0 * n * v + 16 * n, launches=chunks)  # lse and the label's logp
    cost.kernel(spec, nbytes=32 * n, launches=CHUNK_LOSS_LAUNCHES * chunks)
    grad_bytes = 4 if e == 4 else e  # G in place over fp32 logits, else in the operand dtype
    cost.kernel(spec, nbytes=(4.0 + grad_bytes) * n * v, launches=chunks)  # softmax gradient
    if shape.need_hidden:  # grad_h rows = G @ W: complete per chunk, cast once
        cost.kernel(spec, flops=2 * nvh, launches=chunks,
                    nbytes=e * n * v + chunks * v * h * e + 4.0 * n * h)
        cost.kernel(spec, nbytes=n * h * (4 + e), launches=chunks)
    if shape.need_weight:  # grad_W += Gᵀ @ h_c into fp32, cast once at the end
        cost.kernel(spec, flops=2 * nvh, launches=chunks,
                    nbytes=e * n * v + n * h * e + 8.0 * chunks * v * h)
        if e != 4:
            cost.kernel(spec, nbytes=v * h * (4 + e))
    if shape.bias:
        cost.kernel(spec, nbytes=e * n * v, launches=chunks)
    cost.memory_bytes = loss_fused_memory(n, h, v, e, c, need_hidden=shape.need_hidden,
                                          need_weight=shape.need_weight)
    return cost


def loss_fused_backward(shape: Shape, spec: DeviceSpec) -> Cost:
    """The loss-fused backward: the stored gradients scaled in place by the upstream gradient."""
    cost = new_cost(LOSS_FUSED, "backward", shape, spec)
    stored = shape.rows * shape.hidden * shape.need_hidden + (
        shape.vocab * shape.hidden * shape.need_weight + shape.vocab * shape.bias)
    cost.kernel(spec, nbytes=2.0 * shape.dtype_bytes * stored, launches=3)
    return cost


# --------------------------------------------------------------------------- choice


def predict(design: str, phase: str, shape: Shape, spec: DeviceSpec) -> Cost:
    """Cost of ``design`` ("tile", "gemm" or "loss-fused") for ``phase`` ("forward", "backward",
    "fwd+bwd"; the loss-fused forward does the work of both)."""
    costs = {"tile": (tile_forward, tile_backward), "gemm": (gemm_forward, gemm_backward),
             LOSS_FUSED: (loss_fused_forward, loss_fused_backward)}
    if design not in costs:
        raise ValueError(f"unknown design {design!r}; expected one of {tuple(costs)}")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    fwd, bwd = costs[design]
    if phase == "forward":
        return fwd(shape, spec)
    if phase == "backward":
        return bwd(shape, spec)
    return fwd(shape, spec) + bwd(shape, spec)


def choose_design(phase: str, shape: Shape, spec: DeviceSpec, *,
                  deterministic: bool = False) -> str:
    """The design with the smaller predicted time for ``phase`` ("forward" or "backward");
    ``deterministic`` rules out the atomics of the tile backward."""
    if phase == "backward" and deterministic:
        return "gemm"
    costs = {d: predict(d, phase, shape, spec).time_s for d in DESIGNS}
    return min(DESIGNS, key=lambda d: (costs[d], d != "tile"))


def best_plan(shape: Shape, spec: DeviceSpec, *, deterministic: bool = False
              ) -> tuple[str, str, Cost]:
    """(forward design, backward design, their combined fwd+bwd cost) as the dispatcher picks."""
    fwd = choose_design("forward", shape, spec)
    bwd = choose_design("backward", shape, spec, deterministic=deterministic)
    cost = predict(fwd, "forward", shape, spec) + predict(bwd, "backward", shape, spec)
    cost.design = f"{fwd} fwd + {bwd} bwd"
    return fwd, bwd, cost
