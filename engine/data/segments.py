"""The segment plan of a batch: the pieces of each packed or shared-prompt row.

Built on the host at collate time (:mod:`.batch`, :mod:`.shared_prompt`) and carried by the
batch; the model's segment attention (:mod:`fastpo.engine.model.attention`) runs one attention
call per piece, or one dense-masked call over the rows where that is cheaper
(:mod:`.attention_cost`). A piece is CAUSAL (a sequence, or a ``[prompt | chosen]`` run:
self-attention over its own tokens), BRANCH (a completion after the first of a shared-prompt row:
queries over the first ``prompt`` keys of the nearest preceding causal piece, then causal over its
own; a K-way row ``[prompt | c₁ | … | c_K]`` is one causal piece ``[prompt | c₁]`` and K − 1
branches) or PAD (no attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

CAUSAL, BRANCH, PAD = 0, 1, 2


@dataclass(frozen=True)
class Piece:
    """One run of a row: ``kind`` CAUSAL (self-attention), BRANCH (queries over the first
    ``prompt`` keys of the nearest preceding CAUSAL piece, then causal over their own) or PAD;
    ``length`` tokens."""

    kind: int
    length: int
    prompt: int = 0


@dataclass(eq=False)
class SegmentPlan:
    """The pieces of every row of a batch (host integers; built at collate time). ``calls``
    counts the attention calls that ran the plan; ``cache`` keeps what the model's attention
    derives from it once per batch (how to run it, its dense mask), for every layer and the
    reference forward."""

    width: int
    rows: tuple[tuple[Piece, ...], ...]
    calls: int = field(default=0, compare=False)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for r, pieces in enumerate(self.rows):
            if sum(p.length for p in pieces) != self.width:
                raise ValueError(f"segment plan row {r}: pieces cover "
                                 f"{sum(p.length for p in pieces)} tokens of {self.width}")
            for i, p in enumerate(pieces):
                if p.kind != BRANCH:
                    continue
                j = branch_source(pieces, i)
                if j < 0 or not 0 < p.prompt <= pieces[j].length:
                    raise ValueError(f"segment plan row {r}: branch piece {i} needs a preceding "
                                     f"causal piece of at least {p.prompt} tokens (only branch "
                                     "pieces between them)")

    @property
    def num_pieces(self) -> int:
        return sum(p.kind != PAD for row in self.rows for p in row)


def branch_source(pieces: Sequence[Piece], i: int) -> int:
    """The index of the causal piece whose prompt branch piece ``i`` attends to: the nearest
    preceding CAUSAL piece with only BRANCH pieces in between, or -1 when there is none."""
    j = i - 1
    while j >= 0 and pieces[j].kind == BRANCH:
        j -= 1
    return j if j >= 0 and pieces[j].kind == CAUSAL else -1


def packed_plan(lengths: Sequence[int], width: int) -> SegmentPlan:
    """One row of sequences of ``lengths`` tokens, then padding up to ``width``."""
    pieces = [Piece(CAUSAL, n) for n in lengths]
    if width > sum(lengths):
        pieces.append(Piece(PAD, width - sum(lengths)))
    return SegmentPlan(width, (tuple(pieces),))


def shared_prompt_plan(rows: Sequence[Sequence[tuple[int, ...]]], width: int) -> SegmentPlan:
    """Rows of ``(prompt, completion₁, …, completion_K)`` items (K ≥ 2; a pair is ``(p, c, r)``)
    laid out ``[p | c₁ | … | c_K]`` one after the other, then padding up to ``width``."""
    planned = []
    for items in rows:
        pieces = []
        for p, first, *rest in items:
            pieces.append(Piece(CAUSAL, p + first))
            pieces += [Piece(BRANCH, n, prompt=p) for n in rest]
        used = sum(sum(item) for item in items)
        if width > used:
            pieces.append(Piece(PAD, width - used))
        planned.append(tuple(pieces))
    return SegmentPlan(width, tuple(planned))


def attention_pairs(plan: SegmentPlan) -> int:
    """Query-key pairs the plan computes (the diagonal included), for cost estimates."""
    total = 0
    for row in plan.rows:
        for p in row:
            if p.kind == CAUSAL:
                total += p.length * (p.length + 1) // 2
            elif p.kind == BRANCH:
                total += p.length * p.prompt + p.length * (p.length + 1) // 2
    return total
