"""The Triton kernels under an older Triton: ``make test-triton-compat`` (default 3.6.0, the GPU
image's; the pinned one is constraints.txt's, which ``make test`` runs).

    python tests/install/triton_compat.py [--triton 3.6.0] [--venv DIR] [pytest args ...]

Makes (or reuses) a venv at ``--venv`` (default ``.venv-triton-<version>``) with torch pinned
as ``constraints.txt`` pins it and the requested triton, installs the wheel freshly built from
the tracked files (without the native kernel, which is not Triton's), and runs the kernel tests
(``tests/kernels``: the interpreter suite under ``TRITON_INTERPRET=1``, and the AOT compile gates
for sm_80/sm_90, which compile with that Triton's own compiler and read the cubins with the CUDA
tools it ships) against the installed package, from the checkout's tests. Run it with the dev
venv's python (it builds the wheel).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from install_support import ROOT, build_wheel, clean_env, fresh_venv

# what each older Triton needs besides itself in the test venv: Triton 3.6's interpreter turns a
# program id (a 1-element array) into an int with int(), which numpy 2.4 refuses
COMPANIONS = {"3.6.0": ["numpy<2.4"]}
TEST_REQUIREMENTS = ["pytest>=8", "pytest-timeout"]


def installed_version(python: Path, package: str) -> str | None:
    """``package``'s version in the venv of ``python`` (None: no such venv or package)."""
    if not python.is_file():
        return None
    proc = subprocess.run([str(python), "-c", "import importlib.metadata as m, sys; "
                           "print(m.version(sys.argv[1]))", package],
                          capture_output=True, text=True, env=clean_env(), check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", default="3.6.0")
    parser.add_argument("--venv", type=Path, default=None)
    opts, pytest_args = parser.parse_known_args(argv)
    venv = opts.venv or ROOT / f".venv-triton-{opts.triton}"
    start = time.perf_counter()
    python = venv / "bin" / "python"
    requirements = [f"triton=={opts.triton}", *COMPANIONS.get(opts.triton, []),
                    *TEST_REQUIREMENTS]
    if installed_version(python, "triton") != opts.triton:
        print(f"triton compat: making {venv} (torch pinned, {' '.join(requirements)})",
              flush=True)
        fresh_venv(venv, requirements, constraints=False)
    with tempfile.TemporaryDirectory(prefix="fastpo-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                               "--force-reinstall", "--disable-pip-version-check", str(wheel)],
                              env=clean_env(), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
    versions = {p: installed_version(python, p) for p in ("torch", "triton", "numpy")}
    if versions["triton"] != opts.triton:
        print(f"triton compat: the venv has triton {versions['triton']}, not {opts.triton}",
              file=sys.stderr)
        return 1
    ready = time.perf_counter() - start
    print(f"triton compat: {versions} ready in {ready:.0f} s; running tests/kernels", flush=True)
    # the wheel has no native kernel: its tests skip as on a machine without a compiler
    env = clean_env(TRITON_INTERPRET="1", FASTPO_NO_NATIVE="1")
    status = subprocess.run([str(python), "-m", "pytest", "tests/kernels", "-q",
                             "-p", "no:cacheprovider", *pytest_args],
                            cwd=ROOT, env=env, check=False).returncode
    print(f"triton compat: triton {opts.triton}: tests/kernels "
          f"{'passed' if status == 0 else f'FAILED (status {status})'} in "
          f"{time.perf_counter() - start:.0f} s in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
