"""Generated pairs feed the same collate, forward and loss as offline pairs: a fixed set of
generated completions, scored and paired, gives exactly the items, batch, loss and gradients
of the same pairs written as a preference file and read by the offline path."""

from __future__ import annotations

import json

import pytest
import torch

from fastpo.engine.data.batch import collate_batch
from fastpo.engine.data.dataset import tokenize_pairs
from fastpo.engine.data.files import load_preference_records
from fastpo.engine.losses import preference_loss
from fastpo.engine.model.forward import forward_logps, split_pairs
from fastpo.engine.online import (
    build_scorer,
    decode,
    form_pairs,
    load_prompts,
    pairs_dataset,
    pairs_to_items,
    render_prompt_ids,
)

SYSTEM = {"role": "system", "content": "Reply with the number only."}
PROMPTS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"},
    {"prompt": "Q: 3 + 5 =\nA:", "answer": 8},
    {"prompt": [{"role": "user", "content": "What is 9 - 2?"}], "answer": "7"},  # a tie
    {"prompt": [SYSTEM, {"role": "user", "content": "What is 5 + 5?"}], "answer": "10"},
]
SAMPLES = [["4", "5", "It is 4."], [" 9", " 8", " eight"], ["1", "2", "3"],
           ["10", "The sum is 10", "ten"]]


def as_completion(prompt, text):
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def batch_loss(policy, reference, data, share_prompt, pad):
    batch = collate_batch(data, list(range(len(data))), pad_token_id=pad,
                          share_prompt=share_prompt)
    chosen, rejected = split_pairs(forward_logps(policy, batch).sequence, batch.num_pairs)
    with torch.no_grad():
        ref_c, ref_r = split_pairs(forward_logps(reference, batch).sequence, batch.num_pairs)
    out = preference_loss(chosen.logps, rejected.logps, ref_c.logps, ref_r.logps, beta=0.1)
    policy.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return batch, out.loss.detach(), grads


def test_generated_pairs_equal_offline_pairs(tmp_path, tokenizer, tiny_config):
    from transformers import LlamaForCausalLM

    eos = tokenizer.eos_token_id
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    # online: prompts -> "generated" ids (each text's tokens + EOS, as generate ends them)
    records = load_prompts(prompts_path)
    prompt_ids = [render_prompt_ids(r, tokenizer, None) for r in records]
    completion_ids = [[tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
                       for t in samples] for samples in SAMPLES]
    scores = build_scorer({"function": "exact_match"}).score(records,
                                                             decode(tokenizer, completion_ids))
    selection = form_pairs(scores, rule="best_worst", completion_ids=completion_ids)
    assert selection.pairs == [(0, 0, 1), (1, 1, 0), (3, 0, 2)]
    assert selection.tied == 1 and selection.skipped_prompts == [2]
    online = pairs_dataset(pairs_to_items(selection, prompt_ids, completion_ids),
                           tokenizer=tokenizer)

    # offline: the same pairs written as a preference file
    rows = [{"prompt": PROMPTS[p]["prompt"],
             "chosen": as_completion(PROMPTS[p]["prompt"], SAMPLES[p][i]),
             "rejected": as_completion(PROMPTS[p]["prompt"], SAMPLES[p][j])}
            for p, i, j in [(0, 0, 1), (1, 1, 0), (3, 0, 2)]]
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    offline = tokenize_pairs(load_preference_records(pairs_path), tokenizer, max_length=None,
                             max_prompt_length=None)

    assert online.pairs == offline.pairs

    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_config).float()
    torch.manual_seed(1)
    reference = LlamaForCausalLM(tiny_config).float().eval()
    pad = tokenizer.pad_token_id
    for share_prompt in (True, False):
        on_batch, on_loss, on_grads = batch_loss(policy, reference, online, share_prompt, pad)
        off_batch, off_loss, off_grads = batch_loss(policy, reference, offline, share_prompt, pad)
        assert torch.equal(on_batch.input_ids, off_batch.input_ids)
        assert torch.equal(on_batch.target_index, off_batch.target_index)
        assert torch.isfinite(on_loss) and on_loss.item() != pytest.approx(0.6931, abs=1e-4)
        assert torch.equal(on_loss, off_loss)
        assert on_grads.keys() == off_grads.keys() and len(on_grads) > 0
        for name, grad in on_grads.items():
            assert torch.equal(grad, off_grads[name]), name
        if share_prompt:
            shared_loss = on_loss
            assert on_batch.input_ids.shape[0] == 3  # one [prompt | chosen | rejected] row each
    # the shared-prompt rows give the concatenated rows' loss (up to summation order)
    assert shared_loss.item() == pytest.approx(off_loss.item(), abs=1e-5)
