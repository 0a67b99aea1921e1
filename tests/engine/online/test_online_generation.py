"""Sampling from a tiny random Llama with the SmolLM2 tokenizer: reproducible from the
generator (the global RNG untouched), cut at EOS or max_new_tokens, left padding that does not
change a prompt's completion, and the model's mode restored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastpo.engine.errors import InputError
from fastpo.engine.online.generation import (
    SamplingOptions,
    _cut,
    decode,
    ended,
    gathered_for_generation,
    generate,
)

PROMPTS = [[1, 504, 3032, 314], [1, 2000, 17, 9000, 42, 77, 5, 6]]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_reproducible_from_the_generator_and_global_rng_untouched(tiny_model, tokenizer):
    options = SamplingOptions(temperature=1.0, max_new_tokens=6, samples_per_prompt=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(tiny_model, tokenizer, PROMPTS, options=options, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    again = generate(tiny_model, tokenizer, PROMPTS, options=options, generator=gen(7))
    other = generate(tiny_model, tokenizer, PROMPTS, options=options, generator=gen(8))
    assert first == again
    assert first != other
    assert len(first) == 2 and all(len(samples) == 3 for samples in first)
    assert len({tuple(s) for samples in first for s in samples}) > 1  # sampled, not greedy
    g = gen(7)
    generate(tiny_model, tokenizer, PROMPTS, options=options, generator=g)
    assert not torch.equal(g.get_state(), gen(7).get_state())  # the generator advanced


def test_lengths_respect_max_new_tokens_and_eos(tiny_model, tokenizer):
    options = SamplingOptions(max_new_tokens=5, samples_per_prompt=4)
    out = generate(tiny_model, tokenizer, PROMPTS, options=options, generator=gen(0))
    eos = tokenizer.eos_token_id
    for samples in out:
        for ids in samples:
            assert 1 <= len(ids) <= 5
            assert eos not in ids[:-1]
            assert ended(ids, eos) or len(ids) == 5


def test_cut_at_the_first_eos_inclusive():
    assert _cut([5, 6, 2, 2, 2], 2, 8) == [5, 6, 2]
    assert _cut([5, 6, 7, 8], 2, 3) == [5, 6, 7]
    assert _cut([2, 9], 2, 3) == [2]


def test_completion_ends_at_eos(tiny_model, tokenizer):
    # top_k=1 makes sampling greedy; declare the greedy first token the EOS: the completion is
    # exactly that one token
    greedy = SamplingOptions(max_new_tokens=4, samples_per_prompt=2, top_k=1)
    first = generate(tiny_model, tokenizer, PROMPTS[:1], options=greedy, generator=gen(0))
    token = first[0][0][0]
    stop = SimpleNamespace(eos_token_id=token, pad_token_id=tokenizer.pad_token_id)
    out = generate(tiny_model, stop, PROMPTS[:1], options=greedy, generator=gen(0))
    assert out == [[[token], [token]]]
    assert ended(out[0][0], token)


def test_left_padding_does_not_change_a_completion(tiny_model, tokenizer):
    greedy = SamplingOptions(max_new_tokens=6, samples_per_prompt=2, top_k=1)
    alone = generate(tiny_model, tokenizer, PROMPTS[:1], options=greedy, generator=gen(0))
    batched = generate(tiny_model, tokenizer, PROMPTS, options=greedy, generator=gen(0))
    chunked = generate(tiny_model, tokenizer, PROMPTS, generator=gen(0),
                       options=SamplingOptions(max_new_tokens=6, samples_per_prompt=2, top_k=1,
                                               batch_size=1))
    assert batched[0] == alone[0]  # PROMPTS[0] is the shorter one: left-padded in the batch
    assert chunked == batched


def test_mode_restored(tiny_model, tokenizer):
    options = SamplingOptions(max_new_tokens=2)
    tiny_model.train()
    generate(tiny_model, tokenizer, PROMPTS, options=options, generator=gen(0))
    assert tiny_model.training
    tiny_model.eval()
    generate(tiny_model, tokenizer, PROMPTS, options=options, generator=gen(0))
    assert not tiny_model.training
    with gathered_for_generation(tiny_model) as module:  # no ZeRO-3: the module itself
        assert module is tiny_model


def test_decode(tokenizer):
    ids = tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    texts = decode(tokenizer, [[[*ids, tokenizer.eos_token_id], ids[:1]], [ids]])
    assert texts == [[" Paris.", tokenizer.decode(ids[:1])], [" Paris."]]
    assert decode(tokenizer, []) == []


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(samples_per_prompt=0), "samples_per_prompt must be an int >= 1"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1"),
])
def test_bad_sampling_options(options, message):
    with pytest.raises(InputError, match=message):
        SamplingOptions(**options)


def test_bad_arguments(tiny_model, tokenizer):
    options = SamplingOptions()
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        generate(tiny_model, tokenizer, PROMPTS, options=options, generator=0)
    with pytest.raises(TypeError, match="SamplingOptions"):
        generate(tiny_model, tokenizer, PROMPTS, options={}, generator=gen(0))
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate(tiny_model, tokenizer, [[1], []], options=options, generator=gen(0))
    assert generate(tiny_model, tokenizer, [], options=options, generator=gen(0)) == []
