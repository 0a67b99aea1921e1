"""The online batch source: pairs the current policy generates, a scorer ranks, the loss trains on.

Every ``online.steps_per_generation`` optimizer steps a generation round runs:

1. the next ``prompts_per_generation`` prompts of this rank (:class:`~.online_prompts.PromptStream`:
   a seeded shuffle per pass over the prompts file, each rank its share of the global batch);
2. ``samples_per_prompt`` completions of each, sampled by the policy in eval mode with its KV
   cache (``engine/online/generation.py``; the whole model gathered once under ZeRO-3, every
   rank entering together), from this rank's own sampling generator;
3. the scorer's ``[P, K]`` scores, then ``form_pairs`` (best vs worst, or every pair above the
   margin; tied prompts are skipped and counted);
4. the pairs become the offline path's ``TokenizedPair`` items, collated by the same code in
   the job's layout (shared-prompt rows by default: the prompt is shared by construction) — or,
   with ``online.kway_rows`` (the default when ``samples_per_prompt`` > 2), each prompt that gave
   a pair becomes one K-way item of all its samples (``engine/online/kway.py``): one row
   ``[prompt | s₁ | … | s_K]``, every sample through the policy and the reference once, the
   same pairs picked by index and the same loss.

A round must give at least ``steps_per_generation × gradient_accumulation_steps`` pairs (K-way
items) — one per micro-batch; while any rank has fewer, every rank generates from further
prompts (the ranks agree on the host, so ZeRO-3's collective gathers stay in step), at most
``online.max_generation_attempts`` generation calls per round: a saturated scorer (most prompts
tied) then trains on the pairs the round has, repeated over its micro-batches, and logs
``online/short_round`` (no pair at all stops the run, naming the reason). The pairs are spread
evenly over the round's micro-batches, at most ``optimization.micro_batch_size`` pairs (K-way
items) each: the widest-margin pairs (widest score ranges) are kept and the rest counted as
``online/pairs_unused``.

Resume is exact: the prompt stream's position is in ``trainer_state.json``, and each rank's
sampling generator and the pairs of a round still in training are in ``source/rank*.json``.
Generation synchronizes with the host (sampling decides when to stop); the steps of a round
after the first run without any synchronization of ours, like offline steps.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.batch import PreferenceBatch
from ..data.dataset import TokenizedDataset, TokenizedPair
from ..data.ranked import TokenizedRanked
from ..online.generation import SamplingOptions, decode, gathered_for_generation, generate
from ..online.kway import ranked_items, ranked_round_dataset
from ..online.pairs import PairSelection, form_pairs, pairs_dataset, pairs_to_items
from ..online.prompts import PromptRecord, render_prompt_ids
from ..online.scoring import Scorer
from .batch_source import SourceExhausted, collate_to_device
from .config import ConfigError, TrainConfig
from .integrity import CheckpointError, write_hashed
from .online_metrics import round_metrics, saturation_metrics, score_stats, scorer_counts
from .online_prompts import PromptStream

logger = logging.getLogger(__name__)

STATE_FORMAT = "fastpo-online-source-v1"


def sampling_generator(seed: int, rank: int, what: str) -> torch.Generator:
    """A CPU generator seeded from the run's seed, the rank and its use (training, eval)."""
    digest = hashlib.sha256(f"fastpo-online:{what}:{seed}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _generator_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def _set_generator_state(generator: torch.Generator, text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"generator state must be base64 text, got {type(text).__name__}")
    raw = bytearray(base64.b64decode(text, validate=True))
    generator.set_state(torch.frombuffer(raw, dtype=torch.uint8))


def _counts_text(scorer: Scorer, counts: dict[str, int]) -> str:
    """The scorer's counters for an error message ("" when it keeps none)."""
    if not counts:
        return ""
    text = f"; {scorer}: " + ", ".join(f"{value} {key}" for key, value in counts.items())
    if counts.get("no_decisions") and counts.get("no_decisions") == counts.get("comparisons"):
        text += " (not one comparison was decided: check that the judge answers '1' or '2')"
    return text


class OnlineSource:
    """Generation rounds as micro-batches (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, prompts: list[PromptRecord],
                 scorer: Scorer, *, runtime: Any, policy: Callable[[], nn.Module],
                 agree: Callable[[bool], bool]) -> None:
        on, opt = cfg.online, cfg.optimization
        if on is None:
            raise ValueError("OnlineSource needs the config's online section")
        self.cfg, self.online, self.tokenizer, self.prompts = cfg, on, tokenizer, prompts
        self.scorer, self.rt, self.policy, self.agree = scorer, runtime, policy, agree
        self.options = SamplingOptions(temperature=on.temperature, top_p=on.top_p,
                                       max_new_tokens=on.max_new_tokens,
                                       samples_per_prompt=on.samples_per_prompt)
        world = runtime.world_size
        if len(prompts) < on.prompts_per_generation * world:
            raise ConfigError(
                f"online.prompts {on.prompts}: {len(prompts)} prompts make no generation round "
                f"of online.prompts_per_generation {on.prompts_per_generation} × {world} ranks; "
                "lower it or add prompts")
        self.stream = PromptStream(len(prompts), seed=cfg.seed, per_rank=on.prompts_per_generation,
                                   rank=runtime.rank, world_size=world)
        self.micro_batches = on.steps_per_generation * opt.gradient_accumulation_steps
        self.cap = opt.pairs_per_batch()  # pairs per micro-batch at most (None: no cap)
        self.total_steps = opt.max_steps or (
            opt.num_epochs * self.stream.rounds_per_pass * on.steps_per_generation)
        self.generator = sampling_generator(cfg.seed, runtime.rank, "train")
        self.kway = on.uses_kway_rows()
        self._prompt_ids: dict[int, list[int]] = {}
        self.round: dict[str, Any] | None = None  # the pairs of the round in training
        self.step_in_round = 0
        self.steps_in_pass, self._pass = 0, 0  # steps since the prompt pass ``_pass`` began
        self._generated_now = False  # whether this step's round was generated in this step
        self._step_groups: list[list[int]] = []  # this step's micro-batches (round indices)

    # ---------------------------------------------------------------------------- prompts
    def prompt_ids(self, row: int) -> list[int]:
        if row not in self._prompt_ids:
            self._prompt_ids[row] = render_prompt_ids(self.prompts[row], self.tokenizer,
                                                      self.cfg.data.max_prompt_length,
                                                      self.cfg.data.chat_template_kwargs)
        return self._prompt_ids[row]

    # ---------------------------------------------------------------------------- a round
    def sample(self, records: list[PromptRecord], prompt_ids: list[list[int]],
               options: SamplingOptions, generator: torch.Generator
               ) -> tuple[list[list[list[int]]], torch.Tensor, float]:
        """Completions ``[P][K]``, their scores ``[P, K]`` and the seconds of ``generate`` (the
        policy in eval mode, gathered whole under ZeRO-3; with no prompts only the gathering,
        which every rank must enter as often as the others)."""
        if not records:
            with gathered_for_generation(self.policy()):
                return [], torch.zeros(0, self.online.samples_per_prompt), 0.0
        start = time.perf_counter()
        with gathered_for_generation(self.policy()) as module:
            completions = generate(module, self.tokenizer, prompt_ids, options=options,
                                   generator=generator)
        seconds = time.perf_counter() - start
        scores = self.scorer.score(records, decode(self.tokenizer, completions))
        return completions, scores, seconds

    def _generate_round(self) -> dict[str, Any]:
        """Generate, score and pair until every rank has a pair (a K-way item) per micro-batch,
        or ``max_generation_attempts`` calls were made."""
        start = time.perf_counter()
        items: list[TokenizedPair] | list[TokenizedRanked] = []
        chosen: list[float] = []
        rejected: list[float] = []
        pair_item: list[int] = []  # K-way rows: the item of each pair
        selections: list[PairSelection] = []
        completions: list[list[int]] = []
        sample_scores: list[float] = []
        scorer_stats: list[dict[str, int]] = []  # the scorer's counters of each call
        generate_seconds = 0.0
        attempts = self.online.max_generation_attempts
        while True:
            rows = self.stream.next_rows()
            prompt_ids = [self.prompt_ids(r) for r in rows]
            sampled, scores, seconds = self.sample([self.prompts[r] for r in rows], prompt_ids,
                                                   self.options, self.generator)
            generate_seconds += seconds
            scorer_stats.append(dict(self.scorer.last_stats))
            selection = form_pairs(scores, rule=self.online.pair_rule, margin=self.online.margin,
                                   completion_ids=sampled)
            selection = self._per_prompt_cap(selection)
            selections.append(selection)
            completions.extend(c for samples in sampled for c in samples)
            sample_scores.extend(scores.reshape(-1).tolist())  # host scores (the scorer's)
            if selection.pairs and self.kway:
                new, found = ranked_items(selection, scores, prompt_ids, sampled,
                                          rule=self.online.pair_rule, margin=self.online.margin)
                chosen.extend(c for c, _, _ in found)
                rejected.extend(r for _, r, _ in found)
                pair_item.extend(len(items) + i for _, _, i in found)
                items.extend(new)
            elif selection.pairs:
                items.extend(pairs_to_items(selection, prompt_ids, sampled))
                chosen.extend(selection.chosen_scores)
                rejected.extend(selection.rejected_scores)
            if self.agree(len(items) >= self.micro_batches) or len(selections) == attempts:
                break
            logger.warning("online: %d prompts gave %d %s for %d micro-batches (ties: %d); "
                           "sampling more prompts", sum(s.num_prompts for s in selections),
                           len(items), "K-way items" if self.kway else "pairs",
                           self.micro_batches, sum(s.tied for s in selections))
        if not self.agree(bool(items)):
            seen = sum(s.num_prompts for s in selections)
            raise SourceExhausted(
                f"online: {seen} prompts of {self.online.prompts} (× {self.rt.world_size} ranks) "
                "gave no pair: every prompt's samples scored the same (or within online.margin); "
                "the policy has converged on the scorer, or the scorer cannot tell samples apart "
                "(check it, raise online.samples_per_prompt or lower online.margin)"
                + _counts_text(self.scorer, scorer_counts(scorer_stats)))
        short = len(items) < self.micro_batches
        if short:
            logger.warning("online: the round has %d %s for %d micro-batches after %d generation "
                           "calls (online.max_generation_attempts; tie fraction %.2f): training "
                           "on them, repeated", len(items),
                           "K-way items" if self.kway else "pairs", self.micro_batches,
                           len(selections), sum(s.tied for s in selections)
                           / max(sum(s.num_prompts for s in selections), 1))
        if self.kway:
            kept, unused = self._keep_items(items, pair_item)
            keep = set(kept)
            index = {old: new for new, old in enumerate(kept)}
            members = [n for n, i in enumerate(pair_item) if i in keep]
            pairs = len(pair_item)
        else:
            kept, unused = self._keep(chosen, rejected)
            members, index, pairs = kept, {}, len(items)
        metrics = round_metrics(selections, completions, sample_scores,
                                eos_token_id=self.tokenizer.eos_token_id,
                                generate_seconds=generate_seconds, pairs=pairs,
                                unused=unused, scorer_stats=scorer_stats)
        metrics.update(saturation_metrics(sample_scores, attempts=len(selections), short=short))
        return {"items": [items[i] for i in kept], "chosen": [chosen[n] for n in members],
                "rejected": [rejected[n] for n in members],
                "pair_item": [index[pair_item[n]] for n in members] if self.kway else None,
                "metrics": metrics, "seconds": time.perf_counter() - start}

    def _keep_items(self, items: list[TokenizedRanked], pair_item: list[int]
                    ) -> tuple[list[int], int]:
        """K-way items trained on (the widest score ranges when over the cap, in generation
        order) and how many of the round's pairs are left unused."""
        limit = None if self.cap is None else self.cap * self.micro_batches
        if limit is None or len(items) <= limit:
            return list(range(len(items))), 0
        spread = [max(it.scores) - min(it.scores) for it in items]
        kept = sorted(sorted(range(len(items)), key=lambda i: -spread[i])[:limit])
        keep = set(kept)
        return kept, sum(1 for i in pair_item if i not in keep)

    def _per_prompt_cap(self, selection: PairSelection) -> PairSelection:
        """``max_pairs_per_prompt``: the first (widest) pairs of each prompt."""
        cap = self.online.max_pairs_per_prompt
        if cap is None:
            return selection
        taken: dict[int, int] = {}
        keep = []
        for n, (p, _, _) in enumerate(selection.pairs):
            taken[p] = taken.get(p, 0) + 1
            if taken[p] <= cap:
                keep.append(n)
        return PairSelection(
            [selection.pairs[n] for n in keep], [selection.chosen_scores[n] for n in keep],
            [selection.rejected_scores[n] for n in keep], selection.num_prompts,
            selection.samples_per_prompt, tied=selection.tied,
            below_margin=selection.below_margin, identical=selection.identical,
            skipped_prompts=selection.skipped_prompts)

    def _keep(self, chosen: list[float], rejected: list[float]) -> tuple[list[int], int]:
        """Indices of the pairs trained on (the widest margins when over the cap, in their
        generation order) and how many are left unused."""
        n = len(chosen)
        if self.cap is None or n <= self.cap * self.micro_batches:
            return list(range(n)), 0
        limit = self.cap * self.micro_batches
        widest = sorted(range(n), key=lambda i: rejected[i] - chosen[i])[:limit]
        return sorted(widest), n - limit

    def _groups(self) -> list[list[int]]:
        """The round's pairs spread evenly over its micro-batches (contiguous groups; fewer
        pairs than micro-batches: one each, repeated in turn)."""
        n, parts = len(self.round["items"]), self.micro_batches
        if n < parts:
            return [[i % n] for i in range(parts)]
        sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
        starts = [sum(sizes[:i]) for i in range(parts)]
        return [list(range(s, s + size)) for s, size in zip(starts, sizes)]

    # -------------------------------------------------------------------------- the seam
    def step_batches(self) -> Iterator[PreferenceBatch]:
        generated = self.round is None
        if generated:
            self.round = self._generate_round()
        self._generated_now = generated
        if self.round["pair_item"] is not None:
            dataset: TokenizedDataset = ranked_round_dataset(
                self.round["items"], rule=self.online.pair_rule, margin=self.online.margin,
                tokenizer=self.tokenizer)
        else:
            dataset = pairs_dataset(self.round["items"], tokenizer=self.tokenizer)
        ga = self.cfg.optimization.gradient_accumulation_steps
        groups = self._groups()[self.step_in_round * ga:(self.step_in_round + 1) * ga]
        self._step_groups = groups
        for indices in groups:
            yield collate_to_device(dataset, indices, data=self.cfg.data,
                                    pad_token_id=self.tokenizer.pad_token_id, with_kl=False,
                                    device=self.rt.device)

    def end_step(self) -> dict[str, Any]:
        round_ = self.round
        members = [i for group in self._step_groups for i in group]
        if round_["pair_item"] is not None:  # K-way items: the pairs of the step's items
            mine = set(members)
            members = [n for n, i in enumerate(round_["pair_item"]) if i in mine]
        record: dict[str, Any] = {"epoch": self.stream.epoch}
        record.update(score_stats([round_["chosen"][i] for i in members],
                                  [round_["rejected"][i] for i in members]))
        record.update(round_["metrics"])
        if self._generated_now:
            record["online/generation_seconds"] = round_["seconds"]
        self.step_in_round += 1
        if self.step_in_round == self.online.steps_per_generation:
            self.round, self.step_in_round = None, 0
        self.steps_in_pass = self.steps_in_pass + 1 if self.stream.epoch == self._pass else 1
        self._pass = self.stream.epoch
        return record

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.stream.epoch, "step_in_epoch": self.steps_in_pass,
                "online": {"prompt_index": self.stream.index, "prompts": len(self.prompts),
                           "step_in_round": self.step_in_round}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        online = state.get("online")
        if not isinstance(online, dict):
            raise CheckpointError("the checkpoint was written by an offline run (no 'online' "
                                  "state); it cannot continue as online training")
        if online.get("prompts") != len(self.prompts):
            raise CheckpointError(f"the checkpoint's run had {online.get('prompts')} prompts; "
                                  f"{self.online.prompts} has {len(self.prompts)} (the prompt "
                                  "order would change)")
        index, in_round = online.get("prompt_index"), online.get("step_in_round")
        if type(index) is not int or not 0 <= index <= len(self.prompts) \
                or type(in_round) is not int \
                or not 0 <= in_round < self.online.steps_per_generation:
            raise CheckpointError(f"the checkpoint's online position (prompt_index {index!r}, "
                                  f"step_in_round {in_round!r}) does not fit {len(self.prompts)} "
                                  f"prompts and online.steps_per_generation "
                                  f"{self.online.steps_per_generation}")
        self.stream.epoch, self.stream.index = state["epoch"], index
        self._pass, self.steps_in_pass = state["epoch"], state["step_in_epoch"]
        self.step_in_round = in_round

    def save_rank_state(self, folder: Path, rank: int) -> None:
        """This rank's sampling generator and the pairs of the round in training (JSON)."""
        round_ = self.round if self.step_in_round else None
        kway = round_ is not None and round_["pair_item"] is not None
        data = {"format": STATE_FORMAT, "generator": _generator_state(self.generator),
                "round": None if round_ is None else {
                    "items": [[it.prompt_ids, it.completions, it.scores] if kway
                              else [it.prompt_ids, it.chosen_ids, it.rejected_ids]
                              for it in round_["items"]],
                    "chosen": round_["chosen"], "rejected": round_["rejected"],
                    "pair_item": round_["pair_item"], "metrics": round_["metrics"]}}
        (folder / "source").mkdir(exist_ok=True)
        with write_hashed(folder / "source" / f"rank{rank:05d}.json") as f:
            f.write(json.dumps(data).encode("utf-8"))

    def load_rank_state(self, folder: Path, rank: int) -> None:
        path = folder / "source" / f"rank{rank:05d}.json"
        try:
            data = json.loads(path.read_text("utf-8"))
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} state")
            _set_generator_state(self.generator, data["generator"])
            saved = data["round"]
            kway = saved is not None and saved.get("pair_item") is not None
            self.round = None if saved is None else {
                "items": [TokenizedRanked([int(t) for t in item[0]],
                                          [[int(t) for t in c] for c in item[1]],
                                          [float(v) for v in item[2]]) if kway
                          else TokenizedPair(*[[int(t) for t in part] for part in item])
                          for item in saved["items"]],
                "chosen": [float(v) for v in saved["chosen"]],
                "rejected": [float(v) for v in saved["rejected"]],
                "pair_item": [int(i) for i in saved["pair_item"]] if kway else None,
                "metrics": {str(k): float(v) for k, v in saved["metrics"].items()},
                "seconds": 0.0}
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError,
                RuntimeError, binascii.Error) as exc:
            raise CheckpointError(f"{path}: unreadable online source state ({exc})") from None
        if (self.round is None) != (self.step_in_round == 0):
            raise CheckpointError(f"{path}: the pending round does not match step_in_round "
                                  f"{self.step_in_round} of trainer_state.json")
