"""Which extra to install when a module of ``fastpo.engine`` needs one that is missing.

``pip install fastpo`` gives the ops and the losses (torch, triton, numpy); the trainer's
packages come with ``fastpo[train]``, TRL with ``fastpo[trl]``, Liger with ``fastpo[liger]``.
Importing, say, ``fastpo.engine.train`` without the ``train`` extra raises
:class:`MissingExtraError` (a ``ModuleNotFoundError``)::

    fastpo.engine.train needs the 'train' extra: pip install 'fastpo[train]' (pydantic is not
    installed)

How: :func:`install` (called by ``fastpo.engine``) puts a finder on ``sys.meta_path`` that
looks, once, whether every extra's packages are importable. When they all are (the full
install) it does nothing at all. When one is missing, it wraps the loader of each
``fastpo.engine.*`` module so that a ``ModuleNotFoundError`` for a package of an extra becomes
that message, naming the module the caller imported (the outermost one) and the extra.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.abc import Loader, MetaPathFinder
from types import ModuleType
from typing import Any

# top-level import name -> the extra that installs it
EXTRA_OF = {
    "datasets": "train",
    "deepspeed": "train",
    "peft": "train",
    "psutil": "train",
    "pydantic": "train",
    "safetensors": "train",
    "tqdm": "train",
    "transformers": "train",
    "yaml": "train",
    "trl": "trl",
    "liger_kernel": "liger",
    "bitsandbytes": "qlora",
}
PREFIX = "fastpo.engine."


class MissingExtraError(ModuleNotFoundError):
    """A module of ``fastpo.engine`` needs an extra that is not installed."""

    def __init__(self, module: str, extra: str, package: str) -> None:
        super().__init__(f"{module} needs the {extra!r} extra: pip install 'fastpo[{extra}]' "
                         f"({package} is not installed)", name=package)
        self.module, self.extra, self.package = module, extra, package


def extra_for(exc: BaseException) -> tuple[str, str] | None:
    """(extra, package) when ``exc`` says a package of an extra is missing, else None."""
    if isinstance(exc, MissingExtraError):
        return exc.extra, exc.package
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.split(".")[0]
        if root in EXTRA_OF:
            return EXTRA_OF[root], root
    return None


class _GuardedLoader(Loader):
    """Delegates to the real loader; turns a missing extra package into MissingExtraError."""

    def __init__(self, loader: Loader, fullname: str) -> None:
        self._loader, self._fullname = loader, fullname

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        except ModuleNotFoundError as exc:
            found = extra_for(exc)
            if found is None:
                raise
            raise MissingExtraError(self._fullname, *found) from exc

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, get_resource_reader, ...
        return getattr(self._loader, name)


def _importable(name: str) -> bool:
    """Whether ``import name`` can find the package (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked)
        return False


class _ExtrasFinder(MetaPathFinder):
    """Wraps the loaders of ``fastpo.engine.*`` modules while an extra's package is missing."""

    def __init__(self) -> None:
        self._missing: set[str] | None = None

    def missing(self) -> set[str]:
        if self._missing is None:
            self._missing = set()  # set first: find_spec below re-enters this finder
            self._missing = {name for name in EXTRA_OF if not _importable(name)}
        return self._missing

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not fullname.startswith(PREFIX) or not self.missing():
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _GuardedLoader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once per process)."""
    if not any(isinstance(finder, _ExtrasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ExtrasFinder())
