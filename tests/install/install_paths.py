"""Every install path of fastpo, from the built wheel, each in a fresh venv: ``make test-install``.

    python tests/install/install_paths.py [--paths kernels,train,trl,liger] [--jobs 2] [--keep]
                                          [--with REQUIREMENT ...]

Builds the wheel once (from the tracked files, with the native CPU kernel, as ``pip install``
from a source checkout builds it), then per path: a new venv, torch pinned by
``constraints.txt``, ``pip install 'fastpo-*.whl[extra]'``, and the path's check script run by
that venv's python from a scratch folder outside the checkout (no ``PYTHONPATH``, the model hub
offline). Run it with the dev venv's python: it reads the SmolLM2 tokenizer and the demo pairs
from that venv's asset cache (``fastpo.engine.data.assets``; nothing is downloaded).

    kernels   pip install fastpo             check_kernels_only.py: ops fwd+bwd against float64
                                             on every CPU backend, no trainer module imported
    train     pip install 'fastpo[train]'    check_train.py: fastpo-train offline, --resume, online
    trl       pip install 'fastpo[trl]'      check_trl.py: patch_trainer on a TRL DPOTrainer
    liger     pip install 'fastpo[liger]'    check_liger.py: the fused linear loss modules
                                             against Liger's

``--with`` adds requirements to every path's install, e.g. ``--with transformers==5.17.0
--paths train,trl`` proves an older transformers. Exit status 0 when every path passes; each
path's output is printed when it fails.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from install_support import build_wheel, clean_env, fresh_venv

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class InstallPath:
    name: str
    extra: str  # "" for the plain install
    script: str
    env: tuple[tuple[str, str], ...] = ()
    needs_assets: int = 0  # how many of (tokenizer folder, pairs file) the script takes


PATHS = {
    "kernels": InstallPath("kernels", "", "check_kernels_only.py",
                           env=(("TRITON_INTERPRET", "1"),)),
    "train": InstallPath("train", "train", "check_train.py", needs_assets=2),
    "trl": InstallPath("trl", "trl", "check_trl.py", needs_assets=1),
    "liger": InstallPath("liger", "liger", "check_liger.py"),
}


def assets() -> list[str]:
    """The tokenizer folder and the demo pairs file, from the dev venv's cache."""
    from fastpo.engine.data.assets import default_tokenizer_dir, demo_preference_data

    return [str(default_tokenizer_dir()), str(demo_preference_data())]


def check(path: InstallPath, wheel: Path, work: Path, args: list[str], extra: list[str]
          ) -> tuple[bool, str, str, dict[str, float]]:
    """Install ``path`` into a fresh venv and run its check: (passed, its summary line, its
    whole output, seconds of each stage)."""
    start = time.perf_counter()
    folder = work / path.name
    folder.mkdir()
    requirement = f"{wheel}[{path.extra}]" if path.extra else str(wheel)
    try:
        python = fresh_venv(folder / "venv", [requirement, *extra])
    except RuntimeError as exc:
        return False, "", str(exc), {"install": time.perf_counter() - start}
    installed = time.perf_counter()
    run = folder / "run"
    run.mkdir()
    proc = subprocess.run([str(python), str(HERE / path.script), *args[:path.needs_assets]],
                          cwd=run, env=clean_env(**dict(path.env)), capture_output=True,
                          text=True, timeout=1200, check=False)
    seconds = {"install": installed - start, "check": time.perf_counter() - installed}
    lines = proc.stdout.strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else "", proc.stdout + proc.stderr, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--jobs", type=int, default=2, help="paths installed and run at once")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--with", dest="extra", action="append", default=[],
                        metavar="REQUIREMENT", help="also install this into every venv")
    opts = parser.parse_args(argv)
    names = [n for n in opts.paths.split(",") if n]
    unknown = sorted(set(names) - set(PATHS))
    if unknown:
        parser.error(f"unknown install paths {unknown}; known: {', '.join(PATHS)}")

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fastpo-install-"))
    try:
        args = assets() if any(PATHS[n].needs_assets for n in names) else []
        wheel = build_wheel(work / "dist", native=True)
        built = time.perf_counter() - start
        print(f"install paths: built {wheel.name} in {built:.0f} s"
              + (f"; every venv also gets {opts.extra}" if opts.extra else ""), flush=True)
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            futures = {n: pool.submit(check, PATHS[n], wheel, work, args, opts.extra)
                       for n in names}
            results = {n: f.result() for n, f in futures.items()}
    finally:
        if opts.keep:
            print(f"install paths: scratch folder kept at {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = []
    for name, (ok, summary, output, seconds) in results.items():
        times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        print(f"  {name:8s} {'ok  ' if ok else 'FAIL'} ({times}) {summary if ok else ''}")
        if not ok:
            failed.append(name)
            print(f"---- {name}: output ----\n{output[-6000:]}\n---- end of {name} ----")
    total = time.perf_counter() - start
    print(f"install paths: {len(names) - len(failed)} of {len(names)} passed in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
