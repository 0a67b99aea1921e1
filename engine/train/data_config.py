"""The ``data`` section of the training config: files, column mappings, mixtures, the
tokenization cache, the batch layout and what to do with bad rows (re-exported by
``config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, JsonValue, model_validator

from .config_base import Section


def _check_columns(columns: dict[str, str] | None, key: str) -> None:
    from ..data.columns import check_column_mapping

    if columns:
        check_column_mapping(columns, key)  # a ValueError: pydantic names the key


class MixtureEntry(Section):
    """One source of a weighted mixture: files (or ``save_to_disk`` folders), their share,
    their own column mapping (default: ``data.columns``) and split."""

    path: str | list[str]
    weight: float = Field(gt=0.0)
    columns: dict[str, str] | None = None
    split: str | None = None

    @model_validator(mode="after")
    def _check(self) -> MixtureEntry:
        _check_columns(self.columns, "columns")
        return self

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class DataConfig(Section):
    """Preference data. ``train`` null (and no ``mixture``) means the 300 English demo pairs
    (``demo_name``). ``train`` / ``eval``: a file (.json, .jsonl, .parquet, .csv, .arrow), a
    ``save_to_disk`` folder or a list of them (concatenated); ``columns`` maps fields to your
    column names; ``mixture`` instead of ``train``: weighted sources, ``mixture_size`` items
    drawn with the seed (default: as many as the first source to run out allows)."""

    train: str | list[str] | None = None
    eval: str | list[str] | None = None  # separate held-out data; otherwise eval_fraction of train
    columns: dict[str, str] = Field(default_factory=dict)  # field -> column, e.g. prompt: question
    split: str | None = None  # the split of a save_to_disk DatasetDict (default: train)
    mixture: list[MixtureEntry] | None = None
    mixture_size: int | None = Field(None, gt=0)
    chat_template_kwargs: dict[str, JsonValue] = Field(default_factory=dict)  # enable_thinking..
    cache: bool = True  # tokenization cached on disk (keyed by data, tokenizer and settings)
    cache_dir: str | None = None  # default: $FASTPO_CACHE/tokenized (~/.cache/fastpo)
    demo_name: str = "dpo_en_demo.json"
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_items: int | None = Field(None, gt=0)  # keep only the first N (after the split)
    max_eval_items: int | None = Field(None, gt=0)
    max_length: int | None = Field(1024, gt=1)
    max_prompt_length: int | None = Field(512, gt=0)
    truncation_mode: Literal["keep_end", "keep_start", "drop"] = "keep_end"
    # batch layout (fastpo.engine.train.layout): auto = the cheapest valid one for the data,
    # estimated from its lengths; padded | packed | shared ([prompt | chosen | rejected] rows:
    # the prompt runs once; pairs only) | shared_packed. padding_free / share_prompt, when set,
    # fix that half of the choice (true/false); null leaves it to the layout
    layout: Literal["auto", "padded", "packed", "shared", "shared_packed"] = "auto"
    padding_free: bool | None = None
    share_prompt: bool | None = None
    # length-aware batching (fastpo.engine.data.sampler): items of similar length batched together
    # within windows of length_window micro-batches of the seeded shuffle; auto = on for the
    # layouts that pad rows (padded, shared), off for packed rows (nothing to save)
    group_by_length: bool | Literal["auto"] = "auto"
    length_window: int = Field(50, gt=0)
    # bad rows (fastpo.engine.data.bad_rows): error = stop at the first one, naming file, line
    # and field; skip = drop unreadable or invalid rows, count them by reason, log the first few,
    # and refuse the file when more than max_bad_fraction of its rows are bad
    on_bad_row: Literal["error", "skip"] = "error"
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        _check_columns(self.columns, "data.columns")
        if self.mixture is not None:
            if self.train is not None:
                raise ValueError("give data.train or data.mixture, not both")
            if not self.mixture:
                raise ValueError("data.mixture needs at least one {path, weight} entry")
        elif self.mixture_size is not None:
            raise ValueError("data.mixture_size needs data.mixture")
        for key in ("train", "eval"):
            value = getattr(self, key)
            if isinstance(value, list) and not value:
                raise ValueError(f"data.{key}: an empty list of files")
        return self

    def train_paths(self) -> list[str]:
        """Every training file or folder (of ``train`` or of the mixture)."""
        if self.mixture is not None:
            return [p for entry in self.mixture for p in entry.paths()]
        return _as_list(self.train)

    def eval_paths(self) -> list[str]:
        return _as_list(self.eval)

    def length_grouping(self) -> int | None:
        """The grouping window (micro-batches) for plan_batches, None when off; call after the
        layout is resolved (``padding_free`` known)."""
        on = (not self.padding_free) if self.group_by_length == "auto" else self.group_by_length
        return self.length_window if on else None

    def layout_conflict(self) -> str | None:
        """An explicit layout that padding_free / share_prompt contradict, named."""
        if self.layout == "auto":
            return None
        from .layout import LAYOUTS

        packed, shared = LAYOUTS[self.layout]
        for key, value, implied in (("padding_free", self.padding_free, packed),
                                    ("share_prompt", self.share_prompt, shared)):
            if value is not None and value != implied:
                return (f"data.layout {self.layout!r} means data.{key}: "
                        f"{str(implied).lower()}, but data.{key} is {str(value).lower()}")
        return None

    def wants_shared_prompt(self) -> bool:
        """Whether the layout is fixed to shared-prompt rows (by layout or share_prompt)."""
        return bool(self.share_prompt) or self.layout in ("shared", "shared_packed")


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)
