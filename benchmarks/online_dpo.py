"""Online DPO learns: the mean reward of fresh samples on held-out prompts rises.

    python -m benchmarks.online_dpo                  # the recorded run (minutes on 2 idle cores)
    python -m benchmarks.online_dpo --quick          # a short check that the job runs
    python -m benchmarks.online_dpo --steps 60 --out runs/online-dpo --plots benchmarks/plots

The job: the embedded SmolLM2-135M-Instruct with a LoRA adapter (the reference is the policy
with the adapter off), trained by ``fastpo-train``'s online mode on prompts generated here (no
download): "Answer in at most 5 words: <question>", questions from templates over a list of
topics, the held-out prompts on topics never trained on. The reward is verifiable, a Python
function of the text (:func:`brevity`): 1 for an answer of 1 to ``limit`` words, ``limit /
words`` for a longer one (a completion cut at ``max_new_tokens`` is long), 0 for an empty one.
Each round samples 4 completions of 8 prompts at temperature 1, pairs the best and the worst of
each prompt and takes one optimizer step on them.

The held-out evaluation (``online.eval_prompts``: 2 fresh samples of each held-out prompt, drawn
from the same seeded generator each time) runs before training, every ``--eval-every`` steps and
after. Written: ``online_dpo.csv`` (per step: the round's mean sample reward, its chosen and
rejected means, the loss; and the held-out mean at evaluation steps) and ``online_dpo.png``
(both curves) under ``--plots``; the trainer's own ``metrics.jsonl`` under ``--out``.

``--scorer judge`` scores with a pairwise judge instead (``online.scorer.judge``): the same
embedded SmolLM2-135M-Instruct folder, asked with the default judge template which of two
completions of a prompt is better (each pair in both orders; ``engine/online/judge.py``). By
default (``--judge-decision probability``) the judge generates nothing: P(response 1 is better)
is its next-token softmax restricted to the tokens "1" and "2", and a sample's score is its mean
probability of being preferred, so every question is decided. ``--judge-decision generate``
reads its greedy answer instead (a sample's score is its win rate); SmolLM2-135M is a weak
judge that way: most of its answers do not start with the digit ("The answer is 1.") and count
as no decision, so many prompts tie and a round may sample more prompts. A judge's score ranks
the samples of one prompt only, so there is no held-out score to compare before and after (two
fresh samples share their wins): this run has no evaluation, and ``online_dpo_judge.csv`` /
``online_dpo_judge.png`` follow the training rounds instead: the chosen and rejected scores,
the fraction of the judge's questions left undecided (``online/scorer_no_decision_fraction``,
0 with probabilities), the tie fraction, the completion length (the prompts ask for at most
``--limit`` words) and the seconds of each round's generation and judging. No reward model is
used: there is no local one to load.

    python -m benchmarks.online_dpo --scorer judge --quick        # 2 tiny steps
    python -m benchmarks.online_dpo --scorer judge --steps 4      # ~40-80 s a round, 2 cores
    python -m benchmarks.online_dpo --scorer judge --judge-decision generate --steps 4
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOPICS = [
    "a volcano", "the moon", "a river", "a library", "a bicycle", "a glacier", "a desert",
    "a lighthouse", "a violin", "a compass", "a rainbow", "a forest", "an island", "a bridge",
    "a telescope", "a museum", "a harbor", "a canyon", "a windmill", "a waterfall", "a castle",
    "a submarine", "a garden", "a comet", "a piano", "a kite", "a train", "a market", "a cloud",
    "a mountain", "a camera", "a candle", "an orchard", "a beehive", "a coral reef", "a meadow",
    "a clock", "a map", "a tunnel", "a greenhouse", "a satellite", "a fountain", "a bakery",
    "a lantern", "a snowflake", "a pyramid", "a swamp", "a thunderstorm", "a sailboat",
    "a keyboard", "an airport", "a vineyard", "a cave", "a parrot", "a whale", "a tornado",
    "a bookshelf", "a chess board", "a volleyball", "a subway", "a tea kettle", "a sunflower",
    "a robot", "a scarecrow", "a pine tree", "a hammock", "a stadium", "an anchor", "a quilt",
    "a battery", "a microscope", "a dolphin", "a cactus", "a penguin", "a hot air balloon",
    "a bicycle bell", "a marathon", "a canoe", "a kitchen", "a factory", "a tractor",
]
HELD_OUT_TOPICS = [
    "a planetarium", "a ferry", "a lagoon", "an aquarium", "a skyscraper", "a hedgehog",
    "a trumpet", "an igloo", "a carousel", "a mango", "a zeppelin", "a tugboat", "a bonfire",
    "a typewriter", "a peacock", "a saxophone", "a monastery", "an owl", "a glacier lake",
    "a lemonade stand", "a tram", "a treehouse", "a jellyfish", "a sandcastle",
]
QUESTIONS = ["what is {t}?", "describe {t}.", "why do people like {t}?", "what does {t} do?",
             "where would you find {t}?", "what is special about {t}?"]
INSTRUCTION = "Answer in at most {limit} words: {question}"


def brevity(prompts: Sequence[Any], completions: Sequence[str], *, limit: int = 8
            ) -> list[float]:
    """1 for 1 to ``limit`` words, ``limit / words`` beyond, 0 for an empty answer."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    scores = []
    for text in completions:
        words = len(text.split())
        scores.append(0.0 if words == 0 else 1.0 if words <= limit else limit / words)
    return scores


def write_prompts(path: Path, topics: Sequence[str], *, limit: int, seed: int) -> int:
    """Every question template over ``topics`` (shuffled), one conversational prompt a line."""
    rows = [{"prompt": [{"role": "user", "content": INSTRUCTION.format(
        limit=limit, question=q.format(t=t).capitalize())}]} for t in topics for q in QUESTIONS]
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def job(args: argparse.Namespace, prompts: Path, held_out: Path) -> dict[str, Any]:
    """The training job (a config dict, validated like a YAML file); a judged run has no
    held-out evaluation (module docstring)."""
    evaluate = not judged(args)
    return {
        "seed": args.seed,
        "model": {"name_or_path": None, "lora": {
            "enabled": True, "r": 16, "alpha": 32,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"]}},
        "data": {"max_prompt_length": 64},
        "loss": {"method": "dpo", "loss_type": ["sigmoid"], "beta": args.beta},
        "optimization": {"learning_rate": args.learning_rate, "max_steps": args.steps,
                         "micro_batch_size": args.prompts_per_round, "lr_scheduler": "constant",
                         "warmup_steps": 0, "max_grad_norm": 1.0},
        "deepspeed": {"enabled": False},
        "logging": {"output_dir": str(args.out), "progress": "none", "tensorboard": False,
                    "eval_every": args.eval_every if evaluate else 0,
                    "eval_before": evaluate},
        "checkpoint": {"export": "none"},
        "online": {"prompts": str(prompts),
                   "eval_prompts": str(held_out) if evaluate else None,
                   "samples_per_prompt": args.samples, "temperature": 1.0, "top_p": 1.0,
                   "max_new_tokens": args.max_new_tokens,
                   "prompts_per_generation": args.prompts_per_round, "steps_per_generation": 1,
                   "pair_rule": "best_worst", "eval_samples_per_prompt": 2,
                   "scorer": scorer(args)},
    }


def judged(args: argparse.Namespace) -> bool:
    return args.scorer == "judge"


def scorer(args: argparse.Namespace) -> dict[str, Any]:
    """The ``online.scorer`` section: the brevity reward, or SmolLM2 as a pairwise judge."""
    if not judged(args):
        return {"function": "benchmarks.online_dpo:brevity", "kwargs": {"limit": args.limit}}
    from fastpo.engine.data.assets import default_model_dir

    section = {"judge": str(default_model_dir()), "both_orders": True,
               "decision": args.judge_decision, "batch_size": args.judge_batch_size,
               "dtype": args.judge_dtype}
    if args.judge_decision == "generate":
        section["max_new_tokens"] = args.judge_max_new_tokens
    return section


def write_table(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> Any:
    """Write ``rows`` as CSV (None as empty) and return matplotlib's pyplot for the figure, or
    None when matplotlib is not installed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot")
        return None
    return plt


def write_results(metrics: Path, plots: Path) -> tuple[Path, Path | None, list[dict[str, Any]]]:
    """``online_dpo.csv`` and ``online_dpo.png`` from the run's ``metrics.jsonl``."""
    from fastpo.engine.train.metrics_log import read_jsonl

    train = read_jsonl(metrics, "train")
    evals = {e["step"]: e["online/eval_score_mean"] for e in read_jsonl(metrics, "eval")}
    rows = []
    for step in sorted({0, *(r["step"] for r in train), *evals}):
        record = next((r for r in train if r["step"] == step), {})
        rows.append({"step": step, "eval_score_mean": evals.get(step),
                     "train_score_mean": record.get("online/score_mean"),
                     "chosen_score_mean": record.get("online/chosen_score_mean"),
                     "rejected_score_mean": record.get("online/rejected_score_mean"),
                     "loss": record.get("loss"),
                     "completion_length_mean": record.get("online/completion_length_mean"),
                     "tie_fraction": record.get("online/tie_fraction")})
    table = plots / "online_dpo.csv"
    plt = write_table(table, rows, list(rows[0]))
    if plt is None:
        return table, None, rows
    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(r["step"], r["train_score_mean"]) for r in rows if r["train_score_mean"] is not None]
    ax.plot(*zip(*points), color="0.6", lw=1, label="training rounds: mean reward of samples")
    held = [(r["step"], r["eval_score_mean"]) for r in rows if r["eval_score_mean"] is not None]
    ax.plot(*zip(*held), "o-", color="C0", lw=2, label="held-out prompts: mean reward")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward (brevity, 0-1)")
    ax.set_title("Online DPO, SmolLM2-135M-Instruct + LoRA (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    figure = plots / "online_dpo.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return table, figure, rows


JUDGE_COLUMNS = {"chosen_win_rate": "online/chosen_score_mean",
                 "rejected_win_rate": "online/rejected_score_mean",
                 "no_decision_fraction": "online/scorer_no_decision_fraction",
                 "comparisons": "online/scorer_comparisons",
                 "tie_fraction": "online/tie_fraction",
                 "completion_length_mean": "online/completion_length_mean",
                 "round_seconds": "online/generation_seconds", "loss": "loss"}


def write_judge_results(metrics: Path, plots: Path, decision: str = "probability"
                        ) -> tuple[Path, Path | None, list[dict[str, Any]]]:
    """``online_dpo_judge.csv`` and ``.png``: per step, the judged round's numbers (a round's
    comparisons and seconds only on the step that generated it)."""
    from fastpo.engine.train.metrics_log import read_jsonl

    rows = [{"step": r["step"], **{name: r.get(key) for name, key in JUDGE_COLUMNS.items()}}
            for r in read_jsonl(metrics, "train")]
    table = plots / "online_dpo_judge.csv"
    plt = write_table(table, rows, ["step", *JUDGE_COLUMNS])
    if plt is None or not rows:
        return table, None, rows
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    steps = [r["step"] for r in rows]
    for name, style in (("chosen_win_rate", "C0"), ("rejected_win_rate", "C3"),
                        ("no_decision_fraction", "0.5"), ("tie_fraction", "C1")):
        points = [(s, r[name]) for s, r in zip(steps, rows) if r[name] is not None]
        if points:
            top.plot(*zip(*points), "o-", color=style, lw=1.5, ms=3, label=name)
    top.set_ylabel("fraction")
    top.set_ylim(-0.05, 1.05)
    top.legend(loc="center right", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r["completion_length_mean"] for r in rows], "o-", color="C2", lw=1.5,
                ms=3)
    bottom.set_ylabel("completion tokens (mean)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    top.set_title(f"Online DPO judged by SmolLM2-135M-Instruct (pairwise, both orders, "
                  f"{decision})")
    fig.tight_layout()
    figure = plots / "online_dpo_judge.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    return table, figure, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--prompts-per-round", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=5, help="words of a full-reward answer")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=int, default=24, help="held-out prompts")
    parser.add_argument("--out", type=Path, default=Path("runs/online-dpo"))
    parser.add_argument("--plots", type=Path, default=Path("benchmarks/plots"))
    parser.add_argument("--scorer", choices=("brevity", "judge"), default="brevity",
                        help="the brevity reward, or SmolLM2-135M-Instruct as a pairwise judge")
    parser.add_argument("--judge-decision", choices=("generate", "probability"),
                        default="probability",
                        help="the judge's probabilities of '1' and '2' (default), or its "
                             "greedy answer")
    parser.add_argument("--judge-max-new-tokens", type=int, default=8,
                        help="tokens of the judge's answer (--judge-decision generate)")
    parser.add_argument("--judge-batch-size", type=int, default=16,
                        help="judge questions per forward / generate call")
    parser.add_argument("--judge-dtype", choices=("float32", "bfloat16", "float16"),
                        default="float32")
    parser.add_argument("--quick", action="store_true",
                        help="2 steps, 2 prompts × 3 samples of 8 tokens, a 2-word limit, 4 "
                             "held-out prompts")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.prompts_per_round = 2, 0, 2
        args.samples, args.max_new_tokens, args.held_out, args.limit = 3, 8, 4, 2
    from fastpo.engine.train import train
    from fastpo.engine.train.config_loading import config_from_dict

    data_dir = args.out / "prompts"
    count = write_prompts(data_dir / "train.jsonl", TOPICS, limit=args.limit, seed=args.seed)
    write_prompts(data_dir / "held_out.jsonl", HELD_OUT_TOPICS, limit=args.limit,
                  seed=args.seed + 1)
    held_out = data_dir / "held_out.jsonl"
    lines = held_out.read_text(encoding="utf-8").splitlines()[:args.held_out]
    held_out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = args.out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # this run's records only
    print(f"online DPO: {count} training prompts, "
          + (f"judged by SmolLM2-135M-Instruct ({args.judge_decision}), no held-out "
             "evaluation" if judged(args)
             else f"{len(lines)} held out") + f", {args.steps} steps", flush=True)
    start = time.perf_counter()
    result = train(config_from_dict(job(args, data_dir / "train.jsonl", held_out)))
    seconds = time.perf_counter() - start
    files = f"stopped: {result.stopped}"
    if judged(args):
        table, figure, rows = write_judge_results(metrics, args.plots, args.judge_decision)
        files += f"; {table}" + (f", {figure}" if figure else "")
        if not rows:
            print(f"no training step in {seconds:.0f} s ({files})")
            return 1
        rounds = [r for r in rows if r["comparisons"] is not None]
        print(f"judged {len(rounds)} rounds, {result.steps} steps in {seconds:.0f} s "
              f"({sum(r['round_seconds'] for r in rounds) / len(rounds):.1f} s of generation "
              f"and judging per round); chosen / rejected score "
              f"{rows[0]['chosen_win_rate']:.3f} / {rows[0]['rejected_win_rate']:.3f} at step 1; "
              f"no-decision fraction {rounds[0]['no_decision_fraction']:.2f} (round 1) → "
              f"{rounds[-1]['no_decision_fraction']:.2f} (last); tie fraction "
              f"{rows[0]['tie_fraction']:.2f} (step 1); {rounds[0]['comparisons']:.0f} "
              f"comparisons in round 1; completion length "
              f"{rows[0]['completion_length_mean']:.1f} → {rows[-1]['completion_length_mean']:.1f}"
              f" tokens; {files}")
        return 0
    table, figure, _ = write_results(metrics, args.plots)
    files += f"; {table}" + (f", {figure}" if figure else "")
    before = (result.eval_before or {}).get("online/eval_score_mean")
    after = (result.eval_after or {}).get("online/eval_score_mean")
    if before is None or after is None:
        print(f"no held-out score after {result.steps} steps ({seconds:.0f} s; {files})")
        return 1
    print(f"held-out mean reward of fresh samples: {before:.3f} before → {after:.3f} after "
          f"{result.steps} steps ({seconds:.0f} s); {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
