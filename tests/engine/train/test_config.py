"""Config tree, YAML + CLI overrides, error messages, DeepSpeed JSON, LR schedule, CLI flags."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from fastpo.engine.losses import CPOOptions, DPOOptions, KTOOptions
from fastpo.engine.train import cli
from fastpo.engine.train.config import ConfigError, TrainConfig
from fastpo.engine.train.config_loading import (
    config_from_dict,
    load_config,
    parse_overrides,
    to_yaml,
)
from fastpo.engine.train.deepspeed_config import (
    build_deepspeed_config,
    reconcile_user_config,
    reference_deepspeed_config,
)
from fastpo.engine.train.optimization import lr_lambda


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------- loading, overrides
def test_default_job_is_smollm2_lora_dpo():
    cfg = load_config()
    assert cfg.model.name_or_path is None and cfg.model.lora.enabled
    assert cfg.loss.method == "dpo" and cfg.loss.resolved_loss_types() == ["sigmoid"]
    assert cfg.reference_mode() == "adapter_disabled"
    assert cfg.data.train is None and cfg.optimization.max_steps
    # the main job is the DeepSpeed entrypoint, on one process as on many
    assert cfg.uses_deepspeed(world_size=1) and cfg.uses_deepspeed(world_size=2)
    assert cfg.data.layout == "auto" and cfg.model.attn_implementation == "sdpa"


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "loss:\n  beta: 0.3\noptimization:\n  max_steps: 7\n")
    cfg = load_config(path, overrides=[
        "--loss.beta", "0.25", "--loss.loss_type=[sigmoid, sft]", "--loss.loss_weights",
        "[1.0, 0.5]", "--model.lora.enabled", "true", "--deepspeed.zero_stage", "3",
        "--optimization.max_steps", "null", "--logging.output_dir", "out dir"])
    assert cfg.loss.beta == 0.25  # the override wins over the file
    assert cfg.loss.loss_type == ["sigmoid", "sft"] and cfg.loss.loss_weights == [1.0, 0.5]
    assert cfg.model.lora.enabled is True and cfg.deepspeed.zero_stage == 3
    assert cfg.optimization.max_steps is None and cfg.logging.output_dir == "out dir"
    # a file that only names some keys keeps the schema defaults for the rest
    assert cfg.optimization.learning_rate == TrainConfig().optimization.learning_rate


def test_token_budget_alone_lifts_the_item_cap():
    assert config_from_dict({"optimization": {"max_tokens_per_batch": 512}}
                            ).optimization.pairs_per_batch() is None
    both = config_from_dict({"optimization": {"max_tokens_per_batch": 512,
                                              "micro_batch_size": 3}})
    assert both.optimization.pairs_per_batch() == 3
    assert config_from_dict({}).optimization.pairs_per_batch() == 4


def test_single_loss_type_string_is_a_list():
    assert config_from_dict({"loss": {"loss_type": "ipo"}}).loss.loss_type == ["ipo"]


def test_print_config_round_trips(capsys):
    assert cli.main(["--print-config", "--loss.beta", "0.2"]) == 0
    text = capsys.readouterr().out
    again = config_from_dict(yaml.safe_load(text))
    assert again.loss.beta == 0.2 and again == load_config(overrides=["--loss.beta", "0.2"])
    assert to_yaml(again) == text


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c=x", "--d.e", "-3", "--f", "[1, 2]"]) == [
        ("a.b", 1), ("c", "x"), ("d.e", -3), ("f", [1, 2])]
    with pytest.raises(ConfigError, match=r"--a\.b has no value"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match="expected a --key value override, got 'oops'"):
        parse_overrides(["oops"])


# ---------------------------------------------------------------------------------- errors
def test_unknown_key_in_yaml_names_key_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "seed: 1\nloss:\n  beta: 0.1\n  betta: 0.2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "unknown config key 'loss.betta'" in msg and "did you mean 'beta'" in msg
    assert f"{path}:4" in msg and "valid keys under loss: method, loss_type" in msg


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*valid keys under the "
                                          r"top level: seed, model"):
        config_from_dict({"modle": {}})
    with pytest.raises(ConfigError, match=r"override --optimization.lr: unknown config key "
                                          r"'optimization.lr'.*learning_rate"):
        load_config(overrides=["--optimization.lr", "1e-4"])
    with pytest.raises(ConfigError, match=r"'loss\.beta' is a value, not a section"):
        load_config(overrides=["--loss.beta.x", "1"])


def test_wrong_types_and_ranges_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"optimization.max_steps: .*integer.*\(got 'ten'\)"):
        load_config(overrides=["--optimization.max_steps", "ten"])
    with pytest.raises(ConfigError, match=r"loss.beta: Input should be greater than 0"):
        load_config(overrides=["--loss.beta", "0"])
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage: Input should be 0, 1, 2 or 3"):
        load_config(overrides=["--deepspeed.zero_stage", "4"])
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path, "loss: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


BASE = {"model": {"lora": {"enabled": False}}}


@pytest.mark.parametrize("settings, message", [
    ({"reference": {"mode": "precomputed"}, "deepspeed": {"zero_stage": 3}},
     "reference.mode 'precomputed' with deepspeed.zero_stage 3"),
    ({"model": {"lora": {"enabled": True}}, "reference": {"mode": "separate"}},
     "model.lora.enabled with reference.mode 'separate'"),
    ({"reference": {"mode": "adapter_disabled"}}, "needs model.lora.enabled"),
    ({"loss": {"method": "simpo"}, "reference": {"mode": "separate"}}, "uses no reference"),
    ({"reference": {"mode": "none"}}, "needs reference log-probs but reference.mode is 'none'"),
    ({"reference": {"mode": "none", "sync_steps": 4}, "loss": {"reference_free": True}},
     "make the reference follow the policy"),
    ({"deepspeed": {"offload_param": "cpu", "zero_stage": 2}}, "offload_param needs"),
    ({"deepspeed": {"offload_optimizer": "cpu"}}, "offload_optimizer needs"),
    ({"deepspeed": {"enabled": False, "zero_stage": 2}}, "deepspeed.enabled is false"),
    ({"optimization": {"warmup_steps": 2, "warmup_ratio": 0.1}}, "not both"),
    ({"logging": {"early_stopping_patience": 2}}, "early_stopping_patience needs"),
    ({"logging": {"eval_every": 5}, "data": {"eval_fraction": 0}}, "eval_every > 0 needs"),
    ({"checkpoint": {"export": "merged"}}, "needs model.lora.enabled"),
    ({"loss": {"loss_type": ["sigmoid", "nope"]}},
     "loss.loss_type: unknown loss_type 'nope'; valid loss types are ['sigmoid', 'hinge'"),
    ({"loss": {"method": "cpo", "loss_type": ["sigmoid", "hinge"]}}, "takes one loss type"),
    ({"loss": {"method": "kto", "loss_type": "sigmoid"}}, "loss.loss_type: unknown loss_type "
     "'sigmoid'; valid loss types are ['kto', 'apo_zero_unpaired'] (loss.method 'kto')"),
    ({"loss": {"method": "orpo", "loss_type": "ipo"}}, "unknown 'ipo' for loss.method 'orpo'"),
    ({"loss": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}},
     "loss.loss_weights: loss_weights has 1 entries but loss_type has 2"),
    ({"loss": {"loss_type": "exo_pair"}},
     "loss.label_smoothing: exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)"),
    ({"loss": {"loss_type": "aot", "use_weighting": True}},
     "loss.use_weighting: use_weighting is not defined for ['aot']: they sort the batch"),
    ({"loss": {"loss_type": "nca_pair", "f_divergence_type": "js_divergence"}},
     "loss.f_divergence_type: f_divergence_type='js_divergence' is defined only for loss types"),
])
def test_impossible_combinations(settings, message):
    data = json.loads(json.dumps(BASE))
    for section, values in settings.items():
        data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        config_from_dict(data)
    assert message in str(info.value)


def test_the_loss_section_gives_the_loss_options():
    dpo = config_from_dict({"loss": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.5],
                                     "beta": 0.2, "ld_alpha": 0.5}}).loss
    assert dpo.dpo_options() == DPOOptions(loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5),
                                           beta=0.2, ld_alpha=0.5)
    simpo = config_from_dict({"loss": {"method": "simpo", "simpo_gamma": 0.3}}).loss
    assert simpo.cpo_options() == CPOOptions(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.3)
    assert config_from_dict({"loss": {"method": "cpo"}}).loss.cpo_options().cpo_alpha == 1.0
    with pytest.raises(ConfigError, match="loss\\.cpo_alpha: cpo_alpha is the weight of the chosen "
                                          "answers' NLL term and must be >= 0, got -1\\.0"):
        config_from_dict({"loss": {"method": "cpo", "cpo_alpha": -1.0}})
    kto = config_from_dict({"loss": {"method": "kto", "desirable_weight": 2.0}}).loss
    assert kto.kto_options() == KTOOptions(desirable_weight=2.0)
    # KTO's mismatched KL sequences: only loss_type kto reads them
    assert kto.with_kl() and not dpo.with_kl()
    assert not config_from_dict({"loss": {"method": "kto",
                                          "loss_type": "apo_zero_unpaired"}}).loss.with_kl()


def test_reference_mode_resolution():
    assert config_from_dict({"loss": {"method": "orpo"}}).reference_mode() == "none"
    assert config_from_dict({"loss": {"loss_type": "sft"}}).reference_mode() == "none"
    assert config_from_dict({"loss": {"reference_free": True}}).reference_mode() == "none"
    assert config_from_dict({"loss": {"method": "kto"}}).reference_mode() == "separate"
    lora = {"model": {"lora": {"enabled": True}}}
    assert config_from_dict(lora).reference_mode() == "adapter_disabled"


# ------------------------------------------------------------------------------- DeepSpeed
def test_generated_deepspeed_config():
    cfg = config_from_dict({"optimization": {"micro_batch_size": 3,
                                             "gradient_accumulation_steps": 2,
                                             "max_grad_norm": 0.5, "precision": "bf16",
                                             "learning_rate": 1e-4},
                            "deepspeed": {"zero_stage": 3, "offload_param": "cpu",
                                          "offload_optimizer": "cpu"}})
    ds = build_deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["lr"] == 1e-4
    assert "torch_adam" not in ds["optimizer"]["params"]  # offloaded: DeepSpeed's CPU Adam
    ref = reference_deepspeed_config(ds)
    assert ref["zero_optimization"]["stage"] == 3 and "optimizer" not in ref
    assert "offload_optimizer" not in ref["zero_optimization"]
    stage2 = build_deepspeed_config(config_from_dict({"deepspeed": {"zero_stage": 2}}),
                                    world_size=2)
    assert reference_deepspeed_config(stage2) is None
    assert stage2["optimizer"]["params"]["torch_adam"] is True


def test_user_deepspeed_json_is_reconciled(tmp_path):
    cfg = config_from_dict({"optimization": {"micro_batch_size": 2,
                                             "gradient_accumulation_steps": 4}})
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95]}}}
    out = reconcile_user_config(user, cfg, world_size=2)
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["train_batch_size"] == 16
    assert out["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert out["optimizer"]["params"] == {"lr": cfg.optimization.learning_rate,
                                          "betas": [0.9, 0.95]}
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 8 but the job config "
                                          "gives 4"):
        reconcile_user_config({"gradient_accumulation_steps": 8}, cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"no job setting fills \"auto\" at "
                                          r"zero_optimization.stage3_max_live_parameters"):
        reconcile_user_config({"zero_optimization": {"stage3_max_live_parameters": "auto"}},
                              cfg, world_size=1)
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 1},\n "bad": }')
    with pytest.raises(ConfigError, match=r"ds\.json is not valid JSON \(line 2"):
        build_deepspeed_config(config_from_dict({"deepspeed": {"config_file": str(path)}}),
                               world_size=1)


# ---------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_and_linear():
    cfg = config_from_dict({"optimization": {"warmup_steps": 3, "lr_scheduler": "cosine",
                                             "min_lr_ratio": 0.1}})
    f = lr_lambda(cfg, total_steps=13)
    assert [f(s) for s in range(3)] == [0.25, 0.5, 0.75]
    assert f(3) == pytest.approx(1.0) and f(13) == pytest.approx(0.1)
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = lr_lambda(config_from_dict({"optimization": {"lr_scheduler": "linear",
                                                       "warmup_ratio": 0.2}}), total_steps=10)
    assert lin(1) == pytest.approx(2 / 3) and lin(6) == pytest.approx(0.5)
    assert lin(10) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------- CLI
def test_cli_errors_and_launcher_flags(capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.main(["--loss.bta", "0.1", "--print-config"]) == 2
    assert "unknown config key 'loss.bta'" in capsys.readouterr().err
    assert cli.main(["--local_rank=1", "--print-config"]) == 0
    capsys.readouterr()
    import os

    assert os.environ["LOCAL_RANK"] == "1"
    assert cli.main(["--help"]) == 0 and "fastpo-train --config" in capsys.readouterr().out
    assert cli.main(["--resume", "--print-config"]) == 0
    assert "resume: true" in capsys.readouterr().out
    assert cli.main(["--resume", "runs/x/checkpoints/step-00000010", "--print-config"]) == 0
    assert "resume: runs/x/checkpoints/step-00000010" in capsys.readouterr().out


def test_method_override_brings_its_defaults(tmp_path):
    path = write(tmp_path, "loss:\n  method: dpo\n  loss_type: [ipo, sft]\n  loss_weights: [1, 2]\n"
                           "data:\n  share_prompt: true\n")
    cpo = load_config(path, overrides=["--loss.method", "cpo"])
    assert cpo.loss.resolved_loss_types() == ["sigmoid"] and cpo.loss.loss_weights is None
    assert cpo.data.share_prompt  # paired: kept
    kept = load_config(path, overrides=["--loss.method", "cpo", "--loss.loss_type", "ipo"])
    assert kept.loss.loss_type == ["ipo"]
    kto = load_config(path, overrides=["--loss.method", "kto"])
    assert kto.loss.resolved_loss_types() == ["kto"] and not kto.data.share_prompt
    # the same method again changes nothing; a kto file keeps its own share_prompt refusal
    assert load_config(path, overrides=["--loss.method", "dpo"]).loss.loss_type == ["ipo", "sft"]
    with pytest.raises(ConfigError, match=r"data\.share_prompt applies to paired losses"):
        load_config(path, overrides=["--loss.method", "kto", "--data.share_prompt", "true"])
