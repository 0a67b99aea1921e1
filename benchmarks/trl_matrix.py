"""fastpo's TRL patch against every supported TRL release: same losses as TRL's own fused head?

    python -m benchmarks.trl_matrix                  # latest patch of each supported minor,
                                                     # plus the release below the minimum
    python -m benchmarks.trl_matrix 1.16.0 1.17.0    # these releases
    python -m benchmarks.trl_matrix --steps 5 --work /tmp/my-trl-matrix

For each release: a throwaway venv under ``--work`` (default ``/tmp/fastpo-trl-matrix``) made
from this interpreter with ``--system-site-packages``, plus a ``.pth`` that adds this
interpreter's site-packages behind the venv's own (``--system-site-packages`` alone would expose
the base Python's, not the project venv's): torch, transformers, accelerate, datasets and peft
come from the project venv, nothing heavy is downloaded. That TRL is installed into the venv with
``--no-deps``; the requirements its metadata declares are checked against what the venv sees and
any unmet one is reported (the run still goes ahead, and its result says whether it worked).

In the venv a worker builds a tiny random Llama (hidden 64, 2 layers, the SmolLM2 tokenizer's
49152-token vocabulary; no hub access) and trains it ``--steps`` steps with ``DPOTrainer`` and
with ``KTOTrainer`` twice from the same seed: as TRL ships it, and through
``fastpo.engine.integrations.patch_trainer`` with TRL's chunked log-prob function made to fail
(so every log-prob of the patched run is fastpo's). "ok" means every value TRL logged at every
step (loss, rewards, logps, grad_norm, ...) agrees within rel 2e-4 / abs 2e-5, as in
``tests/engine/integrations/test_trl_integration.py``, and both policy and reference went
through fastpo.
For a release below ``MIN_TRL_VERSION`` the worker checks that ``patch_trainer`` refuses it with
the message naming the minimum. Prints a Markdown table (and notes) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

MARK = "TRL_MATRIX_RESULT "
REL, ABS = 2e-4, 2e-5
DEFAULT_WORK = Path("/tmp/fastpo-trl-matrix")


# --------------------------------------------------------------------------- the parent


def _available_versions() -> list[str]:
    """Every TRL release on the package index (pip index), newest first; [] when unreachable."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "trl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.strip().startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    return []


def default_versions() -> list[str]:
    """The latest patch of each minor from the minimum on, and of the minor just below it."""
    from packaging.version import Version

    from fastpo.engine.integrations.trl_compat import MIN_TRL_VERSION, TESTED_TRL_VERSIONS

    minimum = Version(MIN_TRL_VERSION)
    latest: dict[tuple[int, int], Version] = {}
    for text in _available_versions():
        v = Version(text)
        if v.is_prerelease:
            continue
        key = (v.major, v.minor)
        latest[key] = max(latest.get(key, v), v)
    if not latest:
        return list(TESTED_TRL_VERSIONS)
    supported = sorted(v for k, v in latest.items() if k >= (minimum.major, minimum.minor))
    below = sorted(v for k, v in latest.items() if k < (minimum.major, minimum.minor))
    return [str(v) for v in below[-1:] + supported]


def _make_venv(version: str, work: Path) -> Path:
    venv = work / f"trl-{version}"
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    project_site = sysconfig.get_paths()["purelib"]
    # processed at start-up after the venv's own site-packages is on sys.path: the project's
    # packages (and the fastpo editable install) come after it, so this TRL shadows the project's
    Path(site_dir, "zz_fastpo_project_site.pth").write_text(
        f"import site; site.addsitedir({project_site!r})\n")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
           "--target", site_dir, f"trl=={version}"]
    wheels = Path("/tmp/trl-wheels")
    if wheels.is_dir():
        cmd += ["--find-links", str(wheels)]
    subprocess.run(cmd, check=True)
    return python


def run_version(version: str, work: Path, steps: int) -> dict:
    start = time.perf_counter()
    try:
        python = _make_venv(version, work)
    except subprocess.CalledProcessError as exc:
        return {"version": version, "error": f"set-up failed: {exc}",
                "seconds": time.perf_counter() - start}
    repo = Path(__file__).resolve().parent.parent
    # TRL 1.15's fused head is a Triton kernel with no CPU path (1.16 added one): on a machine
    # without a GPU the unpatched baseline runs it in Triton's interpreter
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([str(python), "-m", "benchmarks.trl_matrix", "--worker",
                           "--steps", str(steps), "--expect", version],
                          cwd=repo, capture_output=True, text=True, env=env, check=False)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
    if result is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        result = {"version": version, "error": "worker failed: " + " | ".join(tail)}
    result["seconds"] = time.perf_counter() - start
    return result


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    if "error" in entry:
        return f"**fails**: {entry['error']}"
    ok = "ok" if entry["ok"] else "**MISMATCH**"
    return f"{ok}, {entry['max_abs_dloss']:.1e}"


def markdown(results: list[dict]) -> str:
    lines = ["| TRL | DPO ok, max \\|Δloss\\| | KTO ok, max \\|Δloss\\| | seconds |",
             "| --- | --- | --- | --- |"]
    notes = []
    for r in results:
        v = r["version"]
        if "error" in r:
            lines.append(f"| {v} | **fails**: {r['error']} | | {r['seconds']:.0f} |")
            continue
        if "refused" in r:
            lines.append(f"| {v} | refused (below the minimum) | refused | {r['seconds']:.0f} |")
            notes.append(f"- {v}: `{r['refused']}`")
        else:
            lines.append(f"| {v} | {_cell(r.get('dpo'))} | {_cell(r.get('kto'))} | "
                         f"{r['seconds']:.0f} |")
        if r.get("unmet"):
            notes.append(f"- {v}: unmet requirements {', '.join(r['unmet'])}")
    stacks = sorted({r["stack"] for r in results if r.get("stack")})
    if len(stacks) == 1:
        notes.append(f"- every release ran with {stacks[0]}")
    else:
        notes += [f"- {r['version']}: ran with {r['stack']}" for r in results if r.get("stack")]
    return "\n".join(lines + (["", *notes] if notes else []))


# --------------------------------------------------------------------------- the worker


def _unmet_requirements() -> list[str]:
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for text in metadata.requires("trl") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req} (missing)")
            continue
        if have not in req.specifier:
            unmet.append(f"{req} (have {have})")
    return unmet


def _compare(stock: list[dict], fast: list[dict], steps: int) -> dict:
    if len(stock) != steps or len(fast) != steps:
        return {"ok": False, "max_abs_dloss": float("nan"),
                "error": f"logged {len(stock)} / {len(fast)} steps, expected {steps}"}
    ok, worst, dloss = True, "", 0.0
    for a, b in zip(stock, fast):
        if a.keys() != b.keys():
            return {"ok": False, "max_abs_dloss": float("nan"),
                    "error": f"logged keys differ: {sorted(a.keys() ^ b.keys())}"}
        dloss = max(dloss, abs(a["loss"] - b["loss"]))
        for key in a:
            if abs(a[key] - b[key]) > ABS + REL * abs(a[key]):
                ok, worst = False, f"{key}: TRL {a[key]} vs fastpo {b[key]}"
    out = {"ok": ok, "max_abs_dloss": dloss, "losses": [a["loss"] for a in stock]}
    if worst:
        out["first_mismatch"] = worst
    return out


def _worker(steps: int, expect: str) -> dict:
    import copy

    import torch
    import transformers
    import trl
    from packaging.version import Version

    from fastpo.engine.data.assets import default_tokenizer_dir, tiny_llama_config
    from fastpo.engine.integrations import trl as fastpo_trl
    from fastpo.engine.integrations.trl_compat import MIN_TRL_VERSION

    result: dict = {"version": trl.__version__, "unmet": _unmet_requirements(),
                    "stack": f"torch {torch.__version__}, transformers "
                             f"{transformers.__version__}"}
    if trl.__version__ != expect:
        result["error"] = f"imported trl {trl.__version__} from {trl.__file__}, not {expect}"
        return result
    if Version(trl.__version__) < Version(MIN_TRL_VERSION):
        try:
            fastpo_trl.patch_trainer(object())
        except ImportError as exc:
            result["refused"] = str(exc).split(": it replaces")[0]
        else:
            result["error"] = "patch_trainer did not refuse a release below the minimum"
        return result

    import datasets
    import trl.trainer.utils as trl_utils
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    with torch.no_grad():
        base.lm_head.weight.mul_(5.0)
    pairs = [("What is the capital of France?", " Paris.", " Rome, I think."),
             ("Name a prime number.", " Seven.", " Nine is prime."),
             ("2 + 2 =", " 4", " 5, obviously"),
             ("Which planet is red?", " Mars.", " Venus is the red one.")]
    preference = datasets.Dataset.from_list(
        [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
    unpaired = datasets.Dataset.from_list(
        [{"prompt": p, "completion": c, "label": good} for p, cc, rr in pairs
         for c, good in ((cc, True), (rr, False))])

    def common(name: str) -> dict:
        return dict(output_dir=f"/tmp/fastpo-trl-matrix/out-{trl.__version__}-{name}",
                    max_steps=steps, logging_steps=1, bf16=False, report_to="none",
                    save_strategy="no", use_cpu=True, optim="sgd", learning_rate=1.0, seed=0,
                    max_length=48, disable_tqdm=True, dataloader_num_workers=0,
                    lr_scheduler_type="constant")

    def build(kind: str, name: str):
        if kind == "dpo":
            args = trl.DPOConfig(**common(name), per_device_train_batch_size=2)
            cls, data = trl.DPOTrainer, preference
        else:
            args = trl.KTOConfig(**common(name), per_device_train_batch_size=4)
            cls, data = trl.KTOTrainer, unpaired
        return cls(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=args,
                   train_dataset=data, processing_class=tokenizer)

    def train(trainer) -> list[dict]:
        trainer.train()
        return [e for e in trainer.state.log_history if "loss" in e]

    class Forbidden:
        @staticmethod
        def apply(*args, **kwargs):
            raise RuntimeError("TRL's chunked log-prob function ran in the patched trainer")

    chunked = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    for kind in ("dpo", "kto"):
        try:
            stock = train(build(kind, "stock"))
            fast_trainer = fastpo_trl.patch_trainer(build(kind, "fast"))
            trl_utils._ChunkedLogProbFunction = Forbidden
            try:
                fast = train(fast_trainer)
            finally:
                trl_utils._ChunkedLogProbFunction = chunked
            entry = _compare(stock, fast, steps)
            counts = fastpo_trl.path_counts(fast_trainer)
            entry["paths"] = counts
            if not counts.get("policy", {}).get("linear") or (
                    kind == "dpo" and not counts.get("reference", {}).get("linear")):
                entry["ok"] = False
                entry["error"] = f"fastpo's path was not taken: {counts}"
        except Exception as exc:  # reported in the matrix: this release fails here
            entry = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        result[kind] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help="TRL releases (default: see module doc)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="where the throwaway venvs go (never inside the repository)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the venvs afterwards")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.worker:
        print(MARK + json.dumps(_worker(args.steps, args.expect)), flush=True)
        return 0
    repo = Path(__file__).resolve().parent.parent
    if args.work.resolve().is_relative_to(repo):
        parser.error(f"--work {args.work} is inside the repository; use a folder under /tmp")
    args.work.mkdir(parents=True, exist_ok=True)
    versions = args.versions or default_versions()
    print(f"TRL releases: {', '.join(versions)}", file=sys.stderr, flush=True)
    results = []
    for version in versions:
        print(f"[trl {version}] ...", file=sys.stderr, flush=True)
        results.append(run_version(version, args.work, args.steps))
        print(f"[trl {version}] {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(args.work / f"trl-{version}", ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    bad = [r for r in results if "error" in r or any(
        not r.get(k, {}).get("ok", True) or "error" in r.get(k, {}) for k in ("dpo", "kto"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
