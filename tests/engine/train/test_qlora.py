"""QLoRA (``model.quantization``) on CPU: bitsandbytes' CPU backend loads the base in 4-bit
(NF4, double quantization) or 8-bit; a LoRA adapter trains on it, the reference is the policy
with its adapter off, the output head stays unquantized and feeds the fused linear op, and a run
resumed from its checkpoint recomputes the next step exactly. Impossible combinations are
refused with the keys named."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import job, losses, merge, run

pytest.importorskip("bitsandbytes", reason="QLoRA needs the qlora extra (bitsandbytes)")

LORA = {"enabled": True, "r": 4, "dropout": 0.0, "target_modules": "all-linear"}
NF4 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def _qlora(tiny_dir, pairs_file, out, quant=NF4, **sections):
    return merge(job(tiny_dir, pairs_file, out, model={"lora": LORA, "quantization": quant}),
                 sections)


def test_a_4bit_base_loads_quantized_with_the_head_on_the_fused_path(tiny_dir, pairs_file,
                                                                     tmp_path, caplog):
    import bitsandbytes as bnb

    from fastpo.engine.train import Trainer
    from fastpo.engine.train.config_loading import config_from_dict
    from fastpo.kernels.zero3 import find_lm_head

    trainer = Trainer(config_from_dict(_qlora(tiny_dir, pairs_file, tmp_path / "run")))
    model = trainer.backend.module
    base = model.get_base_model()
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 2 layers × (4 attention + 3 MLP projections)
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.quant_type == "nf4"
    head = find_lm_head(base)
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert trainer.cfg.reference_mode() == "adapter_disabled"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    caplog.clear()
    out = trainer.forward(trainer.source.collate([0, 1]))
    assert "quantized" not in caplog.text  # no fallback: the fused op read the float head
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_qlora_trains_and_resumes_exactly(tiny_dir, pairs_file, tmp_path):
    data = _qlora(tiny_dir, pairs_file, tmp_path / "run",
                  optimization={"max_steps": 3}, checkpoint={"every_steps": 2, "export": "auto"})
    full = run(data)
    assert len(full.history) == 3 and all(torch.isfinite(torch.tensor(losses(full.history))))
    assert full.history[-1]["loss"] != full.history[0]["loss"]  # the adapter learns
    assert (full.export_dir / "adapter_config.json").exists()  # the adapter alone
    resumed = run(merge(data, {"logging": {"output_dir": str(tmp_path / "resumed")},
                               "checkpoint": {"resume": str(tmp_path / "run" / "checkpoints" /
                                                            "step-00000002"),
                                              "every_steps": 0, "export": "none"}}))
    assert [r["step"] for r in resumed.history] == [3]
    assert losses(resumed.history) == pytest.approx(losses(full.history)[2:], rel=1e-6)


def test_an_8bit_base_trains(tiny_dir, pairs_file, tmp_path):
    result = run(_qlora(tiny_dir, pairs_file, tmp_path / "run",
                        quant={"bits": 8, "quant_type": "nf4", "double_quant": True},
                        optimization={"max_steps": 1}))
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))


@pytest.mark.parametrize(("extra", "message"), [
    ({"model": {"lora": {"enabled": False}}}, "model.quantization needs model.lora.enabled"),
    ({"deepspeed": {"zero_stage": 3}}, "model.quantization with deepspeed.zero_stage 3"),
    ({"checkpoint": {"export": "full"}}, "checkpoint.export 'full' with model.quantization"),
    ({"model": {"quantization": {"bits": 8, "quant_type": "fp4"}}}, "apply to bits 4 only"),
])
def test_impossible_combinations_are_refused(tiny_dir, pairs_file, tmp_path, extra, message):
    from fastpo.engine.errors import InputError
    from fastpo.engine.train.config_loading import config_from_dict

    with pytest.raises((InputError, ValueError), match=message):
        config_from_dict(merge(_qlora(tiny_dir, pairs_file, tmp_path / "run"), extra))
