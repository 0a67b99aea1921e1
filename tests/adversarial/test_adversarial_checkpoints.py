"""Tampered checkpoints, as a hostile sender would make them: ``--resume`` never runs code from
a checkpoint, never resumes a corrupted one, and names the file it refuses.

One tiny DeepSpeed ZeRO-2 + LoRA job (module fixture) writes two checkpoints; every case copies
them and tampers with one file:

- a pickle payload (``__reduce__`` -> ``os.system("touch MARKER")``) planted in each file, with
  the manifest forged to match (as a sender would), is refused by the safe loaders, naming the
  file; the marker is never created (a control shows the payload does create it when unpickled
  the unsafe way);
- the same payload without forging the manifest, and a same-size byte flip in each file, make
  the checkpoint invalid: ``--resume`` falls back to the previous one with a warning naming the
  file (or, named explicitly / with none left, refuses with the reason);
- a truncated or garbage ``trainer_state.json`` or RNG file (forged manifest) is named;
- an edited reference-logps cache is refused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shlex
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from trainer_helpers import isolated_launch, job

from fastpo.engine.train import cli
from fastpo.engine.train.checkpoint import MANIFEST, STATE_FILE, sha256_file, validate_checkpoint
from fastpo.engine.train.metrics_log import read_jsonl

DS_DIR = "deepspeed"
MODEL_STATES = f"{DS_DIR}/mp_rank_00_model_states.pt"
OPTIM_STATES = f"{DS_DIR}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "rng/rank00000.json"
SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # DeepSpeed's recovery scripts: never loaded
LOADED = (MODEL_STATES, OPTIM_STATES, RNG, STATE_FILE)


class Payload:
    """Unpickling it the unsafe way runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_dir, pairs_file):
    """(job dict, checkpoint root) of a 2-step ZeRO-2 LoRA job checkpointed at steps 1 and 2."""
    from fastpo.engine.train import train
    from fastpo.engine.train.config_loading import config_from_dict

    out = tmp_path_factory.mktemp("adversarial-job")
    data = job(tiny_dir, pairs_file, out, deepspeed={"enabled": True, "zero_stage": 2},
               model={"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}},
               checkpoint={"every_steps": 1, "keep_last": 2, "export": "none"})
    from fastpo.engine.train import integrity

    read_back = []

    def counting_sha256(path):
        read_back.append(str(path))
        return sha256_file(path)

    with mock.patch.object(integrity, "sha256_file", counting_sha256):
        with isolated_launch():  # a module-scoped job: its launcher variables must not leak
            train(config_from_dict(data))
    root = out / "checkpoints"
    # DeepSpeed's files and the RNG state were hashed while written, not read back
    assert read_back and not [p for p in read_back if p.endswith((".pt", RNG))], read_back
    assert {Path(p).name for p in read_back} == {STATE_FILE, *SCRIPTS}, read_back
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000001", "step-00000002"]
    files = {str(p.relative_to(root / "step-00000002")) for p in
             (root / "step-00000002").rglob("*") if p.is_file()}
    assert files == {*LOADED, *SCRIPTS, MANIFEST}, files
    return data, root


@pytest.fixture
def case(source, tmp_path):
    """A private copy of the checkpoints, a config file resuming from it, and the marker path."""
    data, root = source
    root_copy = tmp_path / "checkpoints"
    shutil.copytree(root, root_copy)
    config = json.loads(json.dumps(data))
    config["logging"]["output_dir"] = str(tmp_path / "out")
    config["checkpoint"]["dir"] = str(root_copy)
    config_file = tmp_path / "job.json"
    config_file.write_text(json.dumps(config))
    return {"root": root_copy, "config": config_file, "marker": tmp_path / "MARKER",
            "newest": root_copy / "step-00000002", "older": root_copy / "step-00000001"}


def resume(case, target, capsys) -> tuple[int, str]:
    """``fastpo-train --config JOB --resume TARGET`` in this process: (exit status, stderr)."""
    status = cli.main(["--config", str(case["config"]), "--resume", str(target)])
    return status, capsys.readouterr().err


def forge_manifest(folder: Path) -> None:
    """Rewrite the manifest to match the files as they are now (what a sender would do)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    rels = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST]
    manifest["files"] = {rel: (folder / rel).stat().st_size for rel in rels}
    manifest["sha256"] = {rel: sha256_file(folder / rel) for rel in rels}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert validate_checkpoint(folder) is None


def payload_bytes(marker: Path, kind: str) -> bytes:
    """The payload as a torch zip file (``torch.save``) or a bare pickle; checked to be live."""
    if kind == "torch":
        buffer = io.BytesIO()
        torch.save({"module": Payload(marker)}, buffer)
        raw = buffer.getvalue()
        torch.load(io.BytesIO(raw), weights_only=False)  # the unsafe load runs it ...
    else:
        raw = pickle.dumps(Payload(marker))
        pickle.loads(raw)
    assert marker.is_file()  # ... so the payload is live
    marker.unlink()
    return raw


# ------------------------------------------------------------------- pickle payloads, forged
@pytest.mark.parametrize("rel, kind", [(MODEL_STATES, "torch"), (MODEL_STATES, "pickle"),
                                       (OPTIM_STATES, "torch"), (OPTIM_STATES, "pickle"),
                                       (RNG, "pickle"), (STATE_FILE, "pickle")])
def test_payload_in_a_loaded_file_is_refused_and_runs_nothing(case, capsys, rel, kind):
    folder = case["newest"]
    (folder / rel).write_bytes(payload_bytes(case["marker"], kind))
    forge_manifest(folder)
    status, err = resume(case, folder, capsys)
    assert status == 2, err
    assert f"{folder / rel}:" in err
    expected = ("refused to load: it holds Python objects" if rel.endswith(".pt")
                else "unreadable RNG state" if rel == RNG else "unreadable trainer state")
    assert expected in err
    assert "Traceback" not in err
    assert not case["marker"].exists()


@pytest.mark.parametrize("rel", SCRIPTS)
def test_payload_in_a_file_never_loaded_runs_nothing(case, capsys, rel):
    folder = case["newest"]
    (folder / rel).write_bytes(payload_bytes(case["marker"], "pickle"))
    forge_manifest(folder)
    status, err = resume(case, folder, capsys)
    assert status == 0, err  # DeepSpeed's recovery scripts are copied, never read
    assert not case["marker"].exists()


def test_payload_as_the_manifest_is_refused(case, capsys):
    folder = case["newest"]
    (folder / MANIFEST).write_bytes(payload_bytes(case["marker"], "pickle"))
    status, err = resume(case, folder, capsys)
    assert status == 2 and f"{folder}: not a usable checkpoint (unreadable manifest.json" in err
    assert not case["marker"].exists()


# --------------------------------------------------- corruption: fall back, or refuse named
@pytest.mark.parametrize("rel", [*LOADED, *SCRIPTS])
def test_same_size_corruption_falls_back_with_a_warning(case, capsys, caplog, rel):
    path = case["newest"] / rel
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x20  # one bit, size unchanged
    path.write_bytes(bytes(raw))
    reason = f"file {rel} does not match its sha256 in manifest.json"
    # named explicitly: refused with the reason
    status, err = resume(case, case["newest"], capsys)
    assert status == 2 and reason in err
    # --resume (latest): the previous checkpoint, with a warning naming the bad file
    with caplog.at_level(logging.WARNING, logger="fastpo.engine.train.checkpoint"):
        status = cli.main(["--config", str(case["config"]), "--resume"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert reason in caplog.text and "step-00000002" in caplog.text
    train = read_jsonl(case["config"].parent / "out" / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [2]  # step 2 redone from checkpoint 1


def test_payload_without_a_forged_manifest_falls_back_and_none_valid_is_refused(case, capsys,
                                                                             caplog):
    newest, older = case["newest"], case["older"]
    (newest / MODEL_STATES).write_bytes(payload_bytes(case["marker"], "torch"))
    (older / RNG).write_text((older / RNG).read_text()[:-5])  # truncated
    status, err = resume(case, "true", capsys)
    assert status == 2
    assert "no usable checkpoint under" in err
    assert f"step-00000002: file {MODEL_STATES} has" in err
    assert f"step-00000001: file {RNG} has" in err
    assert not case["marker"].exists()


@pytest.mark.parametrize("rel, content, message", [
    (STATE_FILE, b'{"step": 2, "epoch"', "unreadable trainer state"),
    (STATE_FILE, b"\x00" * 64, "unreadable trainer state"),
    (RNG, b'{"format": "fastpo-rng-v1", "python"', "unreadable RNG state"),
    (RNG, b"\xde\xad\xbe\xef" * 16, "unreadable RNG state"),
])
def test_truncated_or_garbage_state_files_are_named(case, capsys, rel, content, message):
    folder = case["newest"]
    (folder / rel).write_bytes(content)
    forge_manifest(folder)
    status, err = resume(case, folder, capsys)
    assert status == 2 and f"{folder / rel}: {message}" in err


def test_truncated_deepspeed_file_is_named(case, capsys):
    folder = case["newest"]
    path = folder / OPTIM_STATES
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    forge_manifest(folder)
    status, err = resume(case, folder, capsys)
    assert status == 2 and f"{path}: not a readable torch file" in err


# ---------------------------------------------------------------------- reference cache
def test_edited_reference_cache_is_refused(tiny_model, tokenizer, demo_pairs_path, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastpo.engine.data.dataset import load_preference_records, tokenize_pairs
    from fastpo.engine.model import reference as R
    from fastpo.engine.model import reference_cache as RC

    records = load_preference_records(demo_pairs_path)[:4]
    pairs = tokenize_pairs(records, tokenizer, max_length=40, max_prompt_length=20)
    path = tmp_path / "ref.safetensors"
    ref = R.FrozenReference(tiny_model)
    key = RC.reference_cache_key(tiny_model, pairs)
    cached = RC.precompute_reference_logps(ref, pairs, path, key=key,
                                          pad_token_id=tokenizer.pad_token_id)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["values_sha256"] == RC.values_checksum(cached.tensors)
    # one value changed, metadata (key included) kept: refused on load and on reuse
    tensors = {k: v.clone() for k, v in cached.tensors.items()}
    tensors["chosen_logps"][1] += 0.5
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"its values do not match the sha256 stored with them"):
        RC.CachedReference(path, key=key)
    with pytest.raises(ValueError, match=r"ref.safetensors: its values do not match"):
        RC.precompute_reference_logps(ref, pairs, path, key=key,
                                     pad_token_id=tokenizer.pad_token_id)
    # a cache without a checksum (older fastpo) and a damaged file are refused too
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items()
                                            if k != "values_sha256"})
    with pytest.raises(ValueError, match=r"has no checksum of its values"):
        RC.CachedReference(path, key=key)
    path.write_bytes(path.read_bytes()[:-8])  # data cut short, header intact
    with pytest.raises(ValueError, match=r"ref.safetensors: not a readable safetensors file"):
        RC.CachedReference(path, key=key)
