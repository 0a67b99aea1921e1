"""What a user installs is what the tree holds, and what the tests import.

The wheel, built from the tracked files as a release builds it, ships every module and data file
under ``api/``, ``kernels/`` and ``engine/`` and nothing else (a package missing from a
hand-written list once kept ``fastpo-train`` from starting); the build leaves nothing in the
checkout; a plain install needs only torch, triton and numpy. The tests themselves import the
installed ``fastpo``: the checkout is not on ``sys.path`` (``pytest.ini``, ``conftest.py``).
The install paths (a fresh venv per extra, from this wheel) are ``install_paths.py``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from install_support import ROOT, build_wheel, expected_files, wheel_files

import fastpo


def test_the_wheel_ships_exactly_the_tracked_package(tmp_path):
    top_level = sorted(p.name for p in ROOT.iterdir())
    wheel = build_wheel(tmp_path)
    assert sorted(p.name for p in ROOT.iterdir()) == top_level, "the build wrote into the checkout"
    files, info = wheel_files(wheel)
    expected = expected_files()
    # the regressions this guards: a subpackage left out, a data file not shipped
    assert {"fastpo/engine/online/__init__.py", "fastpo/engine/train/default.yaml"} <= expected
    assert sorted(expected - files) == [], "tracked files missing from the wheel"
    assert sorted(files - expected) == [], "files in the wheel that the tree does not track"

    assert re.search(r"^fastpo-train = fastpo\.engine\.train\.cli:main$",
                     info["entry_points.txt"], re.M), info["entry_points.txt"]
    requires = re.findall(r"^Requires-Dist: (.+)$", info["METADATA"], re.M)
    plain = {re.split(r"[<>=!~;\[ (]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r}
    assert plain == {"torch", "triton", "numpy"}, requires
    extras = set(re.findall(r"^Provides-Extra: (.+)$", info["METADATA"], re.M))
    assert {"train", "trl", "liger", "dev"} <= extras, extras


def test_the_tests_import_the_installed_package_not_the_checkout():
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path), sys.path
    # the checkout's folders never imported under a top-level name (kernels/ is fastpo.kernels)
    for name in ("kernels", "engine", "api"):
        spec = importlib.util.find_spec(name)
        origins = [spec.origin, *(spec.submodule_search_locations or [])] if spec else []
        assert not any(o and Path(o).resolve().is_relative_to(ROOT / name) for o in origins), (
            name, origins)
    assert importlib.metadata.version("fastpo") == fastpo.__version__
    assert sys.modules["benchmarks"].__file__ == str(ROOT / "benchmarks" / "__init__.py")
