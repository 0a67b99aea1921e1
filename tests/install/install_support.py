"""fastpo's wheel, built as a release builds it, what it must hold, and fresh venvs to install it.

:func:`build_wheel` copies the git-tracked files of the checkout (what a fresh clone holds, with
the working tree's edits) to a scratch folder and runs ``pip wheel --no-deps
--no-build-isolation`` there, so the build's ``build/`` and ``*.egg-info`` never land in the
checkout. :func:`expected_files` is the package the tree describes: every tracked file under
``api/`` (``fastpo``), ``kernels/`` (``fastpo/kernels``) and ``engine/`` (``fastpo/engine``),
Python modules and data files alike. :func:`fresh_venv` makes a venv and installs into it
with torch pinned. Used by ``test_packaging.py``, ``install_paths.py`` (``make test-install``)
and ``triton_compat.py`` (``make test-triton-compat``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder of the checkout -> its path inside the wheel (the design card's layout)
PACKAGE_FOLDERS = {"api": "fastpo", "kernels": "fastpo/kernels", "engine": "fastpo/engine"}


def tracked_files() -> list[str]:
    """The checkout's git-tracked files (paths relative to the root) that exist on disk."""
    if not (ROOT / ".git").exists():
        raise RuntimeError(f"{ROOT} is not a git checkout: the tracked files define the package")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def expected_files() -> set[str]:
    """The paths (inside the wheel) of every file the package must ship."""
    expected = set()
    for name in tracked_files():
        folder, _, rest = name.partition("/")
        if folder in PACKAGE_FOLDERS and rest:
            expected.add(f"{PACKAGE_FOLDERS[folder]}/{rest}")
    return expected


def build_wheel(dest: Path, *, native: bool = False, python: str = sys.executable) -> Path:
    """Build the wheel into ``dest`` from a copy of the tracked files; its path. ``native``:
    compile the csrc/ kernel too (a platform wheel; otherwise a pure-Python one)."""
    src = dest / "src"
    for name in tracked_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ)
    env.pop("FASTPO_NO_NATIVE", None)
    if not native:
        env["FASTPO_NO_NATIVE"] = "1"
    proc = subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--quiet", "--wheel-dir", str(dest), str(src)],
                          cwd=dest, env=env, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("fastpo-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"pip wheel failed (status {proc.returncode}, wheels {wheels}):\n"
                           f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    shutil.rmtree(src)
    return wheels[0]


def wheel_files(wheel: Path) -> tuple[set[str], dict[str, str]]:
    """(the package files of ``wheel``, its ``*.dist-info`` files by name with their text)."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        info = {n.split("/", 1)[1]: archive.read(n).decode("utf-8")
                for n in names if n.split("/", 1)[0].endswith(".dist-info")}
    return {n for n in names if not n.split("/", 1)[0].endswith(".dist-info")}, info


def torch_pin() -> str:
    """The torch requirement of ``constraints.txt`` (e.g. ``torch==2.13.0``)."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.replace(" ", "").startswith("torch=="):
            return line.strip()
    raise RuntimeError("constraints.txt pins no torch")


def fresh_venv(path: Path, requirements: list[str], *, constraints: bool = True) -> Path:
    """A new venv at ``path`` with torch (pinned) installed first, then ``requirements``; its
    python. ``constraints``: pass ``constraints.txt`` (else only torch is pinned, for a triton
    other than the pinned one). Packages that build from source see the venv's torch
    (``--no-build-isolation``), as the README's install lines do."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    python = path / "bin" / "python"
    pin = ["-c", str(ROOT / "constraints.txt")] if constraints else []
    for step in (["setuptools", "wheel", torch_pin()], requirements):
        # --no-compile: torch's thousands of modules are not byte-compiled up front; those a
        # check imports compile when imported (4.1 instead of 4.6 CPU-minutes for the 4 paths)
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile",
                               "--disable-pip-version-check", "--no-build-isolation", *pin,
                               *step], env=clean_env(), capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"pip install {' '.join(step)} into {path} failed:\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would leak the dev venv or the checkout into a
    fresh venv (``PYTHONPATH``, ``VIRTUAL_ENV``, fastpo's and Triton's switches), plus ``extra``;
    the model hub offline."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "TRITON_INTERPRET", "FASTPO_NO_NATIVE",
            "FASTPO_CPU_BACKEND", "PIP_REQUIRE_VIRTUALENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
