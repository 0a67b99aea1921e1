"""Sampling completions from the policy: ``K`` samples per prompt with transformers' generate.

Contract::

    options = SamplingOptions(temperature=0.8, top_p=0.95, max_new_tokens=64,
                              samples_per_prompt=4)
    completions = generate(model, tokenizer, prompt_ids, options=options, generator=g)
    completions[p][k]      # token ids of sample k of prompt p
    texts = decode(tokenizer, completions)   # [prompt][sample] -> str

- A completion holds the sampled tokens after the prompt, up to and including the first EOS,
  or exactly ``max_new_tokens`` tokens when none came (cut: no EOS is appended, so the loss
  scores exactly what the policy sampled). :func:`ended` tells which.
- The model runs in eval mode, without gradient, with its KV cache (``model.generate``); prompts
  of a batch are left-padded. Its train/eval mode is restored afterwards, also on an error.
- Reproducible: the only randomness is one seed drawn from ``generator`` per call; sampling runs
  under ``torch.random.fork_rng`` seeded with it, so the global RNG (the training's dropout, the
  data order) is untouched and the same generator state with the same inputs gives the same
  completions (on one device type and batch composition).
- DeepSpeed: ``generate`` runs the unwrapped module (``engine.module``; wrappers are unwrapped
  with :func:`fastpo.engine.model.forward.unwrap_model`). Under ZeRO-3 each parameter is a
  shard: generate inside :func:`gathered_for_generation` (``with
  gathered_for_generation(engine) as module: generate(module, ...)``), which gathers the whole
  model once for the generation instead of layer by layer per new token, as DeepSpeed documents
  (``zero.GatheredParameters``, ``zero.unwrap_model_for_generation``); it is collective, so
  every rank enters it, each with its own prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..model.forward import unwrap_model
from ..model.gather import gathered

__all__ = ["SamplingOptions", "decode", "ended", "gathered_for_generation", "generate",
           "pad_left"]

_SEED_BOUND = 2**62


@dataclass(frozen=True)
class SamplingOptions:
    """How completions are sampled. ``samples_per_prompt``: 1 for evaluation samples, at least
    2 to form pairs (checked by :func:`~fastpo.engine.online.pairs.form_pairs`); ``top_k`` 0
    disables top-k; ``batch_size`` bounds the prompts of one ``generate`` call (None: all)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    samples_per_prompt: int = 2
    top_k: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"sampling option {name} must be a number, got {value!r}")
            return float(value)

        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"sampling option {name} must be an int >= {low}, "
                                 f"got {value!r}")

        if not number("temperature") > 0:
            raise InputError(f"sampling option temperature must be > 0 (sampling; K greedy "
                             f"samples would all be equal), got {self.temperature!r}")
        if not 0 < number("top_p") <= 1:
            raise InputError(f"sampling option top_p must be in (0, 1], got {self.top_p!r}")
        integer("max_new_tokens", 1)
        integer("samples_per_prompt", 1)
        integer("top_k", 0)
        if self.batch_size is not None:
            integer("batch_size", 1)


def _is_zero3_engine(model: nn.Module) -> bool:
    stage = getattr(model, "zero_optimization_stage", None)
    return (type(model).__name__ == "DeepSpeedEngine" and callable(stage) and stage() == 3
            and getattr(model, "optimizer", None) is not None)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped module, ready for ``generate``: under ZeRO-3 its parameters gathered whole
    for the block (collective: every rank must enter it), elsewhere a no-op.

    Pass the DeepSpeed engine: its ZeRO-3 module hooks are then taken off for the block and put
    back after (DeepSpeed's ``zero.unwrap_model_for_generation``), so that no layer's forward
    releases or re-gathers its parameters, and ranks whose completions end at different lengths
    never wait on each other. A module with ZeRO-3 parameters but no engine gets
    ``zero.GatheredParameters`` only.
    """
    if _is_zero3_engine(model):
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(model):
            yield unwrap_model(model)
        return
    module = unwrap_model(model)
    with gathered(list(module.parameters())):
        yield module


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` of token-id lists (for generate)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _cut(row: list[int], eos_id: int, max_new_tokens: int) -> list[int]:
    row = row[:max_new_tokens]
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def generate(model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], *,
             options: SamplingOptions, generator: torch.Generator) -> list[list[list[int]]]:
    """``options.samples_per_prompt`` sampled completions of each prompt, ``[prompt][sample]``
    → token ids (see the module docstring for cutting, modes and reproducibility)."""
    if not isinstance(options, SamplingOptions):
        raise TypeError(f"options must be SamplingOptions, got {type(options).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not prompt_ids:
        return []
    for i, prompt in enumerate(prompt_ids):
        if not prompt:
            raise ValueError(f"prompt {i} has no tokens")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = eos_id if pad_id is None else pad_id
    module = unwrap_model(model)
    device = _device(module)
    seed = int(torch.randint(_SEED_BOUND, (1,), generator=generator).item())
    k = options.samples_per_prompt
    step = options.batch_size or len(prompt_ids)
    settings = dict(do_sample=True, temperature=float(options.temperature),
                    top_p=float(options.top_p), top_k=options.top_k,
                    max_new_tokens=options.max_new_tokens, min_new_tokens=0,
                    num_return_sequences=k, eos_token_id=eos_id, pad_token_id=pad_id,
                    use_cache=True, repetition_penalty=1.0)
    was_training = module.training
    out: list[list[list[int]]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        module.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), step):
                chunk = prompt_ids[start: start + step]
                ids, mask = pad_left(chunk, pad_id, device)
                sequences = module.generate(input_ids=ids, attention_mask=mask, **settings)
                rows = sequences[:, ids.shape[1]:].tolist()
                for p in range(len(chunk)):
                    out.append([_cut(rows[p * k + s], eos_id, options.max_new_tokens)
                                for s in range(k)])
    finally:
        module.train(was_training)
    return out


def ended(completion: Sequence[int], eos_id: int) -> bool:
    """Whether a completion ended with EOS (else it was cut at ``max_new_tokens``)."""
    return bool(completion) and completion[-1] == eos_id


def decode(tokenizer: Any, completions: list[list[list[int]]], *,
           skip_special_tokens: bool = True) -> list[list[str]]:
    """Texts of the completions, ``[prompt][sample]``, without special tokens by default (what a
    scorer reads)."""
    flat = [ids for samples in completions for ids in samples]
    texts = tokenizer.batch_decode(flat, skip_special_tokens=skip_special_tokens) if flat else []
    out: list[list[str]] = []
    position = 0
    for samples in completions:
        out.append(texts[position: position + len(samples)])
        position += len(samples)
    return out
