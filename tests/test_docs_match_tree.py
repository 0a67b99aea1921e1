"""The README's Layout table and ARCHITECTURE.md describe the tree as it is: every module is named
in its Layout row, and every file or folder either document names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("api", "kernels", "engine", "benchmarks", "csrc")


def layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Layout")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def source_files() -> list[Path]:
    files = []
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            if (path.suffix in (".py", ".cpp", ".h", ".yaml") and path.name != "__init__.py"
                    and "__pycache__" not in path.parts):
                files.append(path)
    return files


def test_every_module_is_named_in_the_layout_table():
    section = layout_section()
    missing = []
    for path in source_files():
        relative = path.relative_to(ROOT)
        spellings = (path.name, str(relative), str(relative.relative_to(relative.parts[0])))
        if not any(f"`{name}`" in section for name in spellings):
            missing.append(str(relative))
    assert missing == [], f"README's Layout table does not name: {missing}"


def named_paths(text: str) -> list[str]:
    """Backticked names that look like files or folders of this repository."""
    return [m for m in re.findall(r"`([^`\s]+)`", text)
            if m.endswith((".py", ".md", ".yaml", ".cpp", ".h", "/")) and not set("*{<") & set(m)]


def exists(name: str) -> bool:
    """A path from the repository root, or from one of the source folders (the documents write
    ``data/batch.py`` for ``engine/data/batch.py``), or a file name found in the tree."""
    if any((base / name).exists() for base in (ROOT, *(ROOT / f for f in SOURCE_FOLDERS),
                                                ROOT / "tests")):
        return True
    return "/" not in name.rstrip("/") and any(ROOT.rglob(name.rstrip("/")))


def test_every_path_the_documents_name_exists():
    for doc in ("ARCHITECTURE.md", "README.md"):
        names = named_paths((ROOT / doc).read_text(encoding="utf-8"))
        assert names, f"{doc} names no file (the pattern is wrong)"
        missing = sorted({n for n in names if not exists(n)})
        assert missing == [], f"{doc} names files that do not exist: {missing}"
