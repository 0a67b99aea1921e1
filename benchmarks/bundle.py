"""The carry bundle: the wheels ``benchmarks gpu`` needs on a GPU machine without network.

    python -m benchmarks bundle --out DIR [--no-trl]

Writes into ``DIR`` (emptied first):

* ``fastpo-<version>-py3-none-any.whl``: fastpo without the native CPU extension
  (``FASTPO_NO_NATIVE=1``, ``pip wheel --no-deps --no-build-isolation`` from a copy of the
  sources, so the checkout is left as it was): pure Python, any CPython ≥ 3.10, any torch;
* the pure-Python rivals of the benchmark, ``pip download --no-deps`` at the versions of
  :data:`RIVALS` (Liger-Kernel, Cut Cross-Entropy: they need only torch and triton);
* ``trl/`` (unless ``--no-trl``): TRL, the baseline of the DPO step, and what it needs that the
  GPU image lacks (``datasets`` and its own needs; :data:`TRL_GROUP`), binary wheels for
  CPython 3.12 on x86-64 Linux, the image's. Installed with ``--find-links``, not ``--no-deps``,
  so that pip takes only what is missing there and reports a version the image cannot satisfy
  (``datasets`` needs a recent ``pyarrow``) instead of replacing the image's packages;
* ``MANIFEST.txt``: each file, its size and SHA-256, and the install lines.

The command fails when the bundle is larger than :data:`LIMIT_BYTES` (60 MiB: what a session
may carry to the device beside the checkout). The README's "On a GPU machine without network"
gives the lines to run there.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO_ROOT

LIMIT_BYTES = 60 * 2**20
SOURCES = ("setup.py", "pyproject.toml", "README.md", "api", "kernels", "engine")
RIVALS = ("liger-kernel==0.8.5", "cut-cross-entropy==25.1.1")
TRL_GROUP = ("trl==1.16.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
             "xxhash==4.1.0", "pandas==2.3.2", "python-dateutil==2.9.0.post0", "pytz==2026.6",
             "tzdata==2026.6", "fsspec==2026.9.0", "jinja2==3.1.6", "markupsafe==3.0.4",
             "six==1.17.0")
TARGET = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64")
INSTALL_LINES = ("pip install --no-deps --no-index DIR/*.whl",
                 "pip install --no-index --find-links DIR/trl trl==1.16.0   # optional: the TRL "
                 "row of the DPO step")


class BundleError(RuntimeError):
    """The bundle cannot be built (a pip step failed, or it is over the size limit)."""


def _pip(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise BundleError(f"`{' '.join(command[2:])}` failed (exit {proc.returncode}):\n{tail}")


def build_fastpo_wheel(out: Path) -> Path:
    """fastpo's wheel without the native extension, built from a copy of the sources."""
    with tempfile.TemporaryDirectory(prefix="fastpo-bundle-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            path = REPO_ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns(
                    "__pycache__", "*.so", "*.pyc"))
            else:
                shutil.copy2(path, src / name)
        env = {**os.environ, "FASTPO_NO_NATIVE": "1"}
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src),
             env=env)
    wheels = sorted(out.glob("fastpo-*.whl"))
    if len(wheels) != 1 or not wheels[0].name.endswith("-py3-none-any.whl"):
        raise BundleError(f"expected one pure-Python fastpo wheel, got {[w.name for w in wheels]}")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(out: Path) -> tuple[str, int]:
    """The manifest's text and the bundle's total size in bytes."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.txt")
    total = sum(p.stat().st_size for p in files)
    lines = [f"# fastpo carry bundle, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
             f"{total / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB)", "",
             "# on the GPU machine, from the checkout's root (DIR = this folder):",
             *(f"#   {line}" for line in INSTALL_LINES),
             "#   python -m benchmarks gpu --preflight && python -m benchmarks gpu --out OUT", ""]
    lines += [f"{p.relative_to(out)}  {p.stat().st_size}  {_sha256(p)}" for p in files]
    return "\n".join(lines) + "\n", total


def build(out: Path, *, trl: bool = True) -> int:
    """Build the bundle into ``out``; its size in bytes. BundleError past the limit."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_fastpo_wheel(out)
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(out), *RIVALS)
    if trl:
        _pip("download", "-q", "--no-deps", *TARGET, "-d", str(out / "trl"), *TRL_GROUP)
    text, total = manifest(out)
    (out / "MANIFEST.txt").write_text(text)
    if total > LIMIT_BYTES:
        raise BundleError(f"the bundle in {out} is {total / 2**20:.1f} MiB, over the "
                          f"{LIMIT_BYTES / 2**20:.0f} MiB limit")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="bundle folder (emptied first)")
    parser.add_argument("--no-trl", action="store_true",
                        help="leave out TRL and the packages it needs (trl/)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        total = build(args.out.resolve(), trl=not args.no_trl)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in sorted(args.out.rglob("*.whl")):
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.relative_to(args.out)}")
    print(f"bundle: {args.out} {total / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB) in "
          f"{time.perf_counter() - start:.0f} s; on the GPU machine:")
    for line in INSTALL_LINES:
        print(f"  {line.replace('DIR', str(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
