"""data.layout: the cost estimate of each batch layout, what auto picks, how the legacy keys map."""

from __future__ import annotations

import logging

import pytest

from fastpo.engine.data import attention_cost as C
from fastpo.engine.data.dataset import DataStats, TokenizedDataset, TokenizedExample, TokenizedPair
from fastpo.engine.train import layout as Lay
from fastpo.engine.train.config import ConfigError, TrainConfig
from fastpo.engine.train.config_loading import load_config


def pairs_of(shapes) -> TokenizedDataset:
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in shapes]
    return TokenizedDataset(pairs, [], DataStats(), {})


def kto_of(shapes) -> TokenizedDataset:
    examples = [TokenizedExample([1] * p, [2] * c, label=i % 2 == 0)
                for i, (p, c) in enumerate(shapes)]
    return TokenizedDataset([], examples, DataStats(), {})


SHAPES = [(4, 3, 6), (1, 1, 1), (7, 2, 3)]


def test_batch_cost_counts_tokens_pairs_and_calls():
    cpu, cuda = C.device_costs("cpu"), C.device_costs("cuda")

    def cost(data, layout, attention="segments", device=cpu, idx=(0, 1, 2), with_kl=False):
        b = Lay.batch_cost(data, list(idx), layout, with_kl=with_kl, attention=attention,
                           device=device)
        return b.tokens, b.pairs, b.calls

    short = pairs_of(SHAPES)  # sequences 7, 10 | 2, 2 | 9, 10 (prompt + chosen, + rejected)
    assert cost(short, "padded") == (6 * 10, 6 * 10 * 10, 1)  # a padding mask: every block
    # pieces this short: one dense-masked call per batch costs less than six calls
    assert cost(short, "packed") == (40, 40 * 40, 1)
    assert cost(short, "shared") == (3 * 13, 3 * 13 * 13, 1)
    assert cost(short, "shared_packed") == cost(short, "shared_packed", "dense") == (28, 784, 1)
    # long pieces: one call each, and a CPU kernel computes a causal square whole
    long = pairs_of([(40 * p, 40 * c, 40 * r) for p, c, r in SHAPES])
    seqs = [280, 400, 80, 80, 360, 400]
    assert cost(long, "packed") == (1600, sum(n * n for n in seqs), 6)
    # [p | c] causal, rejected over prompt + rejected: 280², 240 × 400; 80², 40 × 80; ...
    shared_pairs = 280 ** 2 + 240 * 400 + 80 ** 2 + 40 * 80 + 360 ** 2 + 120 * 400
    assert cost(long, "shared") == (3 * 520, shared_pairs, 6)
    assert cost(long, "shared_packed") == (1120, shared_pairs, 6)
    assert cost(long, "shared_packed", "dense") == (1120, 1120 ** 2, 1)
    # flash-attention's varlen call: the packed row's sequences in one call, causal blocks skipped
    assert cost(long, "packed", "varlen", cuda) == (1600, sum(n * (n + 1) / 2 for n in seqs), 1)
    # KTO with KL sequences: prompt i + completion of example i + 1
    kto = kto_of([(2, 3), (4, 1)])
    assert cost(kto, "packed", "dense", idx=[0, 1], with_kl=True) == (5 + 3 + 5 + 7, 400, 1)
    assert cost(kto, "padded", idx=[0, 1], with_kl=True) == (4 * 7, 4 * 49, 1)


def test_auto_picks_by_the_estimate():
    kw = dict(dims=Lay.ModelDims(), pairs_per_batch=4, max_tokens_per_batch=None,
              with_kl=False)
    long_prompts = pairs_of([(300, 100 + 7 * i, 50 + 11 * i) for i in range(8)])
    choice, costs = Lay.choose_layout(long_prompts, list(Lay.LAYOUTS), attention="segments",
                                      **kw)
    assert choice == "shared_packed"
    by_name = {c.layout: c for c in costs}
    assert by_name["shared_packed"].cost < by_name["shared"].cost < by_name["padded"].cost
    assert by_name["packed"].cost < by_name["padded"].cost
    # dense masks, equal lengths, one-token prompts: the whole-row square makes packing and
    # sharing dearer than plain padded rows
    even = pairs_of([(1, 400, 400)] * 8)
    assert Lay.choose_layout(even, list(Lay.LAYOUTS), attention="dense", **kw)[0] == "padded"
    # the same rows with segment attention: the pieces save no pair on a CPU (a causal square is
    # computed whole), so padded rows, one call per batch, stay the cheaper
    choice, costs = Lay.choose_layout(even, ["padded", "packed"], attention="segments", **kw)
    assert choice == "padded" and costs[1].pairs == costs[0].pairs
    # ragged lengths: packing saves the padding's tokens and pairs
    ragged = pairs_of([(1, 50 + 90 * i, 30 + 40 * i) for i in range(8)])
    choice, costs = Lay.choose_layout(ragged, ["padded", "packed"], attention="segments", **kw)
    assert choice == "packed" and costs[1].pairs < costs[0].pairs


def config(**data) -> TrainConfig:
    return TrainConfig.model_validate({"data": data})


def test_model_dimensions_come_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "intermediate_size": 96, '
                                          '"num_attention_heads": 4, "num_key_value_heads": 2}')
    dims = Lay.ModelDims.of(Lay._model_config(str(tmp_path)))
    assert dims == Lay.ModelDims(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16)
    assert dims.flops_per_token() == 2.0 * (64 * 16 * 12 + 3 * 64 * 96)
    assert Lay._model_config(str(tmp_path / "missing")) is None
    assert Lay.ModelDims.of(None) == Lay.ModelDims()


def test_valid_and_candidate_layouts():
    assert Lay.valid_layouts(paired=True, attn_implementation="sdpa") == list(Lay.LAYOUTS)
    assert Lay.valid_layouts(paired=False, attn_implementation="sdpa") == ["padded", "packed"]
    assert Lay.valid_layouts(paired=True, attn_implementation="flash_attention_2") == [
        "padded", "packed"]
    for data, expected in (({}, list(Lay.LAYOUTS)),
                           ({"padding_free": False}, ["padded", "shared"]),
                           ({"share_prompt": True}, ["shared", "shared_packed"]),
                           ({"padding_free": True, "share_prompt": False}, ["packed"])):
        got = Lay.candidate_layouts(config(**data).data, paired=True, attn_implementation="sdpa")
        assert got == expected, data


def test_resolve_sets_the_flags_and_logs_the_choice_once(caplog):
    data = pairs_of([(300, 120 + 5 * i, 80 + 9 * i) for i in range(6)])
    cfg = config()
    with caplog.at_level(logging.INFO, logger="fastpo.engine.train.layout"):
        assert Lay.resolve_layout(cfg, data, with_kl=False) == "shared_packed"
    assert (cfg.data.layout, cfg.data.padding_free, cfg.data.share_prompt) == (
        "shared_packed", True, True)
    lines = [r.getMessage() for r in caplog.records if "data.layout auto" in r.getMessage()]
    assert len(lines) == 1 and "→ shared_packed" in lines[0] and "padded 1.00×" in lines[0]
    # an explicit key wins; an explicit layout is taken without an estimate
    cfg = config(padding_free=False)
    assert Lay.resolve_layout(cfg, data, with_kl=False) == "shared"
    cfg = config(layout="packed")
    caplog.clear()
    assert Lay.resolve_layout(cfg, data, with_kl=False) == "packed"
    assert (cfg.data.padding_free, cfg.data.share_prompt) == (True, False)
    assert not caplog.records
    # KTO never gets shared-prompt rows
    kto = TrainConfig.model_validate({"loss": {"method": "kto"}})
    choice = Lay.resolve_layout(kto, kto_of([(50, 20 + 150 * (i % 3)) for i in range(6)]),
                                with_kl=True)
    assert choice == "packed" and kto.data.share_prompt is False


def test_config_keys_map_and_conflicts_are_named(capsys):
    assert config().data.layout == "auto" and config().data.share_prompt is None
    assert config(layout="shared", share_prompt=True).data.layout == "shared"
    with pytest.raises(ValueError, match=r"data\.layout 'packed' means data\.padding_free: true, "
                                         r"but data\.padding_free is false"):
        config(layout="packed", padding_free=False)
    with pytest.raises(ValueError, match=r"data\.layout 'shared_packed' applies to paired losses"):
        TrainConfig.model_validate({"data": {"layout": "shared_packed"},
                                    "loss": {"method": "kto"}})
    with pytest.raises(ValueError, match=r"needs model\.attn_implementation 'sdpa' or 'eager'"):
        TrainConfig.model_validate({"data": {"layout": "shared"},
                                    "model": {"attn_implementation": "flash_attention_2"}})
    with pytest.raises(ConfigError, match=r"data\.layout"):
        load_config(overrides=["--data.layout", "diagonal"])
    # a method switch to kto drops the file's shared layout, as it drops share_prompt
    assert load_config(overrides=["--loss.method", "kto"]).data.layout == "auto"
    from fastpo.engine.train import cli

    assert cli.main(["--print-config"]) == 0
    assert "layout: auto" in capsys.readouterr().out
