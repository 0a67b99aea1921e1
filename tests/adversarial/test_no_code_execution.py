"""No code execution from input: the source tree (kernels/, engine/, benchmarks/) holds no
``yaml.load``, ``eval``/``exec``, ``shell=True``, unpickling (``pickle``/``marshal`` loads,
``torch.load`` without ``weights_only=True``), and no ``trust_remote_code`` other than the
user's config field, which defaults to False."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("kernels", "engine", "benchmarks")

# text patterns: found anywhere in a source file (code, comments or strings), they fail; calls
# (eval/exec, torch.load, trust_remote_code, subprocess) are checked on the syntax tree
FORBIDDEN_TEXT = {
    r"\byaml\.(unsafe_)?load\(": "yaml.load (use yaml.safe_load)",
    r"\bshell\s*=\s*True": "shell=True",
    r"\bweights_only\s*=\s*False": "weights_only=False",
    r"\btrust_remote_code\s*=\s*True": "trust_remote_code=True",
    r"\b(pickle|marshal|dill|cloudpickle)\.loads?\(": "unpickling",
    r"\bos\.system\(": "os.system",
}


def _call_name(node: ast.Call) -> str:
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def violations(source: str, name: str) -> list[str]:
    """Every forbidden construct in ``source`` as "name:line: what"."""
    found = []
    for pattern, what in FORBIDDEN_TEXT.items():
        for match in re.finditer(pattern, source):
            found.append(f"{name}:{source.count(chr(10), 0, match.start()) + 1}: {what}")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        call = _call_name(node)
        if call in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
            found.append(f"{name}:{node.lineno}: eval/exec")
        keywords = {k.arg: k.value for k in node.keywords}
        if call in ("torch.load", "torch.serialization.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
        if "trust_remote_code" in keywords:
            value = keywords["trust_remote_code"]
            passed = (isinstance(value, ast.Attribute) and value.attr == "trust_remote_code") \
                or (isinstance(value, ast.Name) and value.id == "trust_remote_code")
            if not passed:
                found.append(f"{name}:{node.lineno}: trust_remote_code not from the user's "
                             "config")
        if call in ("subprocess.run", "subprocess.Popen", "subprocess.call",
                    "subprocess.check_call", "subprocess.check_output") and node.args \
                and not isinstance(node.args[0], (ast.List, ast.Tuple, ast.Name)):
            found.append(f"{name}:{node.lineno}: subprocess with a command string")
    return found


def _sources() -> list[Path]:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20, files  # the tree is really there
    return files


def test_source_tree_runs_no_code_from_input():
    found = []
    for path in _sources():
        found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert found == []


@pytest.mark.parametrize("snippet, what", [
    ("import yaml\nyaml.load(open('x'))\n", "yaml.load"),
    ("import subprocess\nsubprocess.run('ls', shell=True)\n", "shell=True"),
    ("import subprocess\nsubprocess.run(f'ls {x}')\n", "subprocess with a command string"),
    ("import torch\ntorch.load('x.pt')\n", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('x.pt', weights_only=False)\n", "weights_only=False"),
    ("m = f(path, trust_remote_code=True)\n", "trust_remote_code=True"),
    ("m = f(path, trust_remote_code=flag)\n", "trust_remote_code not from the user's config"),
    ("x = eval(text)\n", "eval/exec"),
    ("exec(code)\n", "eval/exec"),
    ("import builtins\nbuiltins.exec(code)\n", "eval/exec"),
    ("import pickle\npickle.loads(b)\n", "unpickling"),
])
def test_the_scan_catches_each_construct(snippet, what):
    assert any(what in v for v in violations(snippet, "snippet.py")), violations(snippet, "s")


def test_allowed_forms_pass_and_remote_code_is_off_by_default():
    from fastpo.engine.train.config import ModelConfig

    allowed = ("import yaml, torch\nyaml.safe_load(t)\nmodel.eval()  # eval() is a method\n"
               "torch.load(p, weights_only=True)\n"
               "f(p, trust_remote_code=cfg.model.trust_remote_code)\n"
               "subprocess.run(['ls', x])\n")
    assert violations(allowed, "ok.py") == []
    assert ModelConfig().trust_remote_code is False
