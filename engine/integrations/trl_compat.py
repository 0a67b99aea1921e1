"""Which TRL releases ``patch_trainer`` works with, found by probing TRL rather than its version.

``patch_trainer`` replaces the fused LM head that TRL's ``DPOTrainer`` and ``KTOTrainer`` install
on their models (``trl.trainer.utils.add_fused_lm_head``, returning a ``FusedCausalLMOutput``).
That head first shipped in TRL 1.15.0; TRL 1.0–1.14 compute logps inside each trainer instead
(1.14 behind ``use_liger_kernel=True``), with nothing for fastpo to replace. Two probes:

- :func:`check_trl` (when ``patch_trainer`` is called): TRL is importable and has the fused head
  API, else an ``ImportError`` naming the minimum version and the installed one;
- :func:`fused_head_closure` (per model): the forward TRL installed keeps every setting fastpo
  reads (temperature, logit scale, soft-cap, fp32 head, requested outputs, backbone attribute) in
  its closure. A missing setting is an error (fastpo would otherwise compute with a default and
  return a wrong number); a setting fastpo does not know is named in a warning.

The tested releases are ``TESTED_TRL_VERSIONS`` (``python -m benchmarks.trl_matrix`` re-runs the
comparison for each of them, or for any other release given on its command line).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

MIN_TRL_VERSION = "1.15"
TESTED_TRL_VERSIONS = ("1.15.0", "1.16.0")
FUSED_HEAD_API = ("add_fused_lm_head", "FusedCausalLMOutput")
FUSED_OUTPUT_FIELDS = ("loss", "log_probs", "label_mask")
FORWARD_PARAMETERS = ("fused_lm_head", "labels", "shift_labels", "num_items_in_batch")
# the closure variables of the forward add_fused_lm_head installs (TRL 1.15 and 1.16)
READ_SETTINGS = ("original_forward", "temperature", "cast_lm_head_to_fp32", "outputs",
                 "final_logit_softcapping", "logit_scale", "backbone_attr")
KNOWN_SETTINGS = (*READ_SETTINGS, "text_config")


def installed_trl_version() -> str:
    """The installed TRL's version string ("unknown" when its metadata says none)."""
    import trl

    version = getattr(trl, "__version__", None)
    if not version:
        from importlib import metadata

        try:
            version = metadata.version("trl")
        except metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def _too_old(installed: str) -> str:
    return (f"fastpo.patch_trainer needs trl >= {MIN_TRL_VERSION} (installed: {installed}): "
            f"it replaces the fused LM head (trl.trainer.utils.add_fused_lm_head) that TRL's "
            f"DPOTrainer and KTOTrainer use from TRL {MIN_TRL_VERSION}.0 on. Upgrade with "
            f"pip install 'trl>={MIN_TRL_VERSION}', or compute the logps in your own "
            "compute_loss (fastpo.engine.integrations.model_parts)")


def check_trl() -> Any:
    """Import TRL and check that it has the fused LM head ``patch_trainer`` replaces.

    Returns the ``trl.trainer.utils`` module. Raises ``ImportError`` when TRL is missing, or is a
    release without the fused head (below ``MIN_TRL_VERSION``), naming the installed version.
    """
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        raise ImportError("fastpo's TRL integration needs trl (pip install "
                          f"'trl>={MIN_TRL_VERSION}')") from exc
    installed = installed_trl_version()
    try:
        import trl.trainer.utils as trl_utils
    except ImportError as exc:
        raise ImportError(_too_old(installed)) from exc
    missing = [name for name in FUSED_HEAD_API if not hasattr(trl_utils, name)]
    if missing:
        raise ImportError(_too_old(installed) + f" [trl.trainer.utils lacks {', '.join(missing)}]")
    fields = getattr(trl_utils.FusedCausalLMOutput, "__dataclass_fields__", {})
    lacking = [name for name in FUSED_OUTPUT_FIELDS if name not in fields]
    if lacking:
        raise ImportError(f"trl {installed}: FusedCausalLMOutput has no {', '.join(lacking)} "
                          f"field; fastpo.patch_trainer is tested with trl "
                          f"{', '.join(TESTED_TRL_VERSIONS)}")
    return trl_utils


def _nonlocals(forward: Any) -> dict[str, Any] | None:
    func = getattr(forward, "__func__", None)
    if func is None:
        return None
    try:
        return dict(inspect.getclosurevars(func).nonlocals)
    except (TypeError, ValueError):
        return None


def fused_head_closure(forward: Any) -> dict[str, Any] | None:
    """The settings in the closure of a forward installed by ``add_fused_lm_head``, or None.

    None when ``forward`` is not such a forward (no ``original_forward`` in its closure). Raises
    ``RuntimeError`` when it is one but lacks a setting fastpo reads or a keyword it is called
    with; warns (once per call) naming closure variables fastpo does not know.
    """
    nonlocals = _nonlocals(forward)
    if nonlocals is None or "original_forward" not in nonlocals:
        return None
    version = installed_trl_version()
    missing = [name for name in READ_SETTINGS if name not in nonlocals]
    try:
        params = inspect.signature(forward.__func__, follow_wrapped=False).parameters
    except (TypeError, ValueError):
        params = {}
    missing += [f"keyword {name}" for name in FORWARD_PARAMETERS if name not in params]
    if missing:
        raise RuntimeError(
            f"trl {version}: the fused LM head's forward lacks {', '.join(missing)}, which "
            "fastpo reads to reproduce TRL's log-probs; fastpo.patch_trainer is tested with trl "
            f"{', '.join(TESTED_TRL_VERSIONS)} (python -m benchmarks.trl_matrix {version} checks "
            "another release)")
    unknown = sorted(set(nonlocals) - set(KNOWN_SETTINGS))
    if unknown:
        warnings.warn(
            f"fastpo: trl {version}'s fused LM head has settings fastpo does not read "
            f"({', '.join(unknown)}); fastpo is tested with trl {', '.join(TESTED_TRL_VERSIONS)}. "
            f"Check this release with python -m benchmarks.trl_matrix {version}",
            RuntimeWarning, stacklevel=3)
    return nonlocals


__all__ = [
    "MIN_TRL_VERSION",
    "TESTED_TRL_VERSIONS",
    "check_trl",
    "fused_head_closure",
    "installed_trl_version",
]
