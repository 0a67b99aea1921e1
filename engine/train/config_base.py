"""What every section of the job config shares: the error type and the section base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..errors import InputError


class ConfigError(InputError):
    """A configuration that cannot be used; the message names the key(s) at fault."""


class Section(BaseModel):
    """A config section: unknown keys are refused, assignments validated."""

    # every float of the config is finite: .inf / nan (and "1e999") are refused with the key
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
