"""README.md's "Use it in your trainer" recipes, executed from the README itself.

Each fenced ``python`` block that follows a ``<!-- snippet: NAME -->`` line is a snippet; they run
in README order in one namespace (the later ones use the set-up's model and batch), inside a
temporary directory. The checks afterwards look at what each snippet left behind, so a README
that drifts from the code fails here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"^<!-- snippet: ([\w-]+) -->\n```python\n(.*?)^```$", re.M | re.S)
EXPECTED = ["setup", "trl", "liger", "custom-loop"]


def snippets() -> dict[str, str]:
    found = SNIPPET.findall(README.read_text(encoding="utf-8"))
    names = [name for name, _ in found]
    assert len(set(names)) == len(names), f"duplicate snippet names in README: {names}"
    return dict(found)


def manual_sequence_logps(net, ids, mask, labels):
    """float64 reference: log softmax of the model's own logits, shifted by hand, summed."""
    with torch.no_grad():
        logits = net(input_ids=ids, attention_mask=mask).logits.double()[:, :-1]
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return torch.where(target != -100, logp, torch.zeros_like(logp)).sum(-1)


def snapshot(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with the parameters' gradients (``deepcopy`` alone drops them)."""
    twin = copy.deepcopy(module)
    for ours, theirs in zip(twin.parameters(), module.parameters()):
        ours.grad = None if theirs.grad is None else theirs.grad.clone()
    return twin


def test_readme_has_the_snippets():
    assert list(snippets()) == EXPECTED


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Run every snippet in order; {name: namespace right after it}."""
    import os

    pytest.importorskip("trl")
    code = snippets()
    namespace: dict = {"__name__": "readme"}
    after = {}
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("readme"))
    try:
        for name in EXPECTED:
            exec(compile(code[name], f"README.md:{name}", "exec"), namespace)
            # models as they were after this snippet (the custom loop trains the shared model)
            after[name] = {key: snapshot(value) if isinstance(value, torch.nn.Module)
                           else value for key, value in namespace.items()}
    finally:
        os.chdir(cwd)
    return after


def test_setup_builds_a_pair_batch(executed):
    ns = executed["setup"]
    ids, labels, b = ns["ids"], ns["labels"], ns["B"]
    assert ids.shape[0] == 2 * b == 2 * len(ns["pairs"])
    assert ((labels != -100).sum(-1) > 0).all(), "every row must have completion tokens"


def test_trl_snippet_trains_through_fastpo(executed):
    from fastpo.engine.integrations import path_counts

    trainer = executed["trl"]["trainer"]
    assert trainer.state.global_step == 2
    counts = path_counts(trainer)
    assert counts["policy"].get("linear", 0) > 0, counts
    final = trainer.state.log_history[-1]
    assert torch.isfinite(torch.tensor(final["train_loss"])), final


def test_liger_snippet_matches_a_float64_reference(executed):
    ns = executed["liger"]
    ref = manual_sequence_logps(ns["model"], ns["ids"], ns["mask"], ns["labels"])
    b = ns["B"]
    torch.testing.assert_close(ns["chosen_logps"].double(), ref[:b], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ns["rejected_logps"].double(), ref[b:], rtol=1e-5, atol=1e-4)
    # the policy is the reference here: IPO's loss is (0 - 1/(2β))² = 25
    torch.testing.assert_close(ns["loss"].detach(), torch.tensor(25.0))
    grads = [p.grad for p in ns["model"].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_custom_loop_snippet_learns_and_matches_float64(executed):
    ns = executed["custom-loop"]
    policy = ns["logps"](ns["model"])
    ref = ns["logps"](ns["ref_model"])
    # after three steps the policy moved away from the reference and prefers the chosen rows
    margin = (policy.logps[: ns["B"]] - ref.logps[: ns["B"]]) - \
        (policy.logps[ns["B"]:] - ref.logps[ns["B"]:])
    assert (margin > 0).all(), margin
    torch.testing.assert_close(ref.logps.double(),
                               manual_sequence_logps(ns["ref_model"], ns["ids"], ns["mask"],
                                                     ns["labels"]), rtol=1e-5, atol=1e-4)
