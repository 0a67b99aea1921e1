"""Loading a job config: YAML file + ``--section.key value`` overrides → a validated TrainConfig.

    cfg = load_config("job.yaml", overrides=["--loss.beta", "0.2", "--optimization.max_steps=50"])

Errors name the offending key path (and the YAML line when the value came from a file) and, for
an unknown key, list the valid ones (with a close match when there is one).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import decode_utf8
from .config import DEFAULT_CONFIG, ConfigError, TrainConfig


def _annotation_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class inside a field annotation (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _annotation_model(arg)
            if found is not None:
                return found
    return None


def _is_mapping(annotation: Any) -> bool:
    """Whether a field annotation is a dict (``dict[str, str]``, ``dict[...] | None``)."""
    if typing.get_origin(annotation) is dict:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is_mapping(arg) for arg in typing.get_args(annotation))
    return False


def _section_at(path: Sequence[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = TrainConfig
    for key in path:
        if model is None or key not in model.model_fields:
            return None
        model = _annotation_model(model.model_fields[key].annotation)
    return model


def _unknown_key_message(path: Sequence[str], key: str) -> str:
    section = _section_at(path)
    where = ".".join(path) or "the top level"
    if section is None:
        return f"unknown config key {'.'.join([*path, key])!r}"
    valid = list(section.model_fields)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown config key {'.'.join([*path, key])!r}{hint}; valid keys under {where}: "
            f"{', '.join(valid)}")


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key path in a YAML document."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def format_validation_error(exc: ValidationError, *, source: str | None = None,
                            lines: dict[tuple[str, ...], int] | None = None,
                            overridden: Collection[tuple[str, ...]] = ()) -> str:
    """One line per problem: the key path (+ file:line, or the command-line override), what is
    wrong, the valid keys."""
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        where = ""
        flag = next((sub for i in range(len(loc), 0, -1)
                     if (sub := tuple(loc[:i])) in overridden), None)
        if flag is not None:
            where = f" (from --{'.'.join(flag)})"
        elif source and lines:
            line = next((lines[tuple(loc[:i])] for i in range(len(loc), 0, -1)
                         if tuple(loc[:i]) in lines), None)
            where = f" ({source}:{line})" if line else f" ({source})"
        if err["type"] == "extra_forbidden":
            out.append(_unknown_key_message(loc[:-1], loc[-1]) + where)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a cross-field rule: the message names its keys
            out.append(msg)
            continue
        key = ".".join(str(p) for p in err["loc"]) or "config"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "value_error" else \
            f" (got {value!r})"
        out.append(f"{key}: {msg}{shown}{where}")
    if len(out) == 1:
        return f"invalid configuration: {out[0]}"
    return "invalid configuration:\n  " + "\n  ".join(out)


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """``--section.key value`` / ``--section.key=value`` pairs; values are YAML scalars
    (``0.2`` a float, ``true`` a bool, ``null`` None, ``[a, b]`` a list)."""
    out: list[tuple[str, Any]] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected a --key value override, got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2
                                       and not _is_number(args[i + 1])):
                raise ConfigError(f"override --{key} has no value")
            text = args[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override --{key}: cannot parse {text!r} ({exc})") from None
        out.append((key.replace("-", "_"), value))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key`` "a.b.c", checking the path against the schema."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override --{key}: empty key segment")
    model: type[BaseModel] | None = TrainConfig
    node = data
    for depth, part in enumerate(parts):
        if model is None:
            raise ConfigError(f"override --{key}: {'.'.join(parts[:depth])!r} is a value, not a "
                              "section")
        if part not in model.model_fields:
            raise ConfigError(f"override --{key}: " + _unknown_key_message(parts[:depth], part))
        if depth == len(parts) - 1:
            node[part] = value
            return
        annotation = model.model_fields[part].annotation
        if depth == len(parts) - 2 and _is_mapping(annotation):  # --data.columns.prompt q
            child = node.get(part)
            node[part] = {**(child if isinstance(child, dict) else {}), parts[-1]: value}
            return
        model = _annotation_model(annotation)
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            node[part] = child
        node = child


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """A YAML config file as a dict, with the line of every key."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from None
    text = decode_utf8(raw, f"config file {path}", ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got "
                          f"{type(data).__name__}")
    return data, _yaml_lines(text)


def _method_brings_its_defaults(data: dict[str, Any], file_method: Any,
                                overridden: set[tuple[str, ...]]) -> None:
    """A ``loss.method`` chosen by an override brings that method's defaults: the file's
    ``loss.loss_type`` / ``loss.loss_weights`` (and ``data.share_prompt`` for the unpaired
    ``kto``) belong to the file's method and are dropped unless overridden too."""
    loss = data.get("loss")
    if ("loss", "method") not in overridden or not isinstance(loss, dict):
        return
    if loss.get("method") == file_method:
        return
    for key in ("loss_type", "loss_weights"):
        if ("loss", key) not in overridden:
            loss.pop(key, None)
    section = data.get("data")
    if (loss.get("method") == "kto" and isinstance(section, dict)
            and ("data", "share_prompt") not in overridden):
        section.pop("share_prompt", None)
        if section.get("layout") in ("shared", "shared_packed") \
                and ("data", "layout") not in overridden:
            section.pop("layout")


def load_config(path: str | Path | None = None, *,
                overrides: Sequence[str] | Sequence[tuple[str, Any]] = ()) -> TrainConfig:
    """The job config: ``path`` (default: the embedded default job) + overrides.

    ``overrides`` are CLI-style strings (``["--loss.beta", "0.2"]``) or ``(key, value)`` pairs.
    Raises :class:`ConfigError` naming every problem.
    """
    source = Path(path) if path is not None else DEFAULT_CONFIG
    data, lines = read_yaml(source)
    loss = data.get("loss")
    file_method = loss.get("method", "dpo") if isinstance(loss, dict) else "dpo"
    pairs = (parse_overrides(overrides) if overrides and isinstance(overrides[0], str)
             else list(overrides))
    overridden = set()
    for key, value in pairs:
        apply_override(data, key, value)
        overridden.add(tuple(key.split(".")))
    _method_brings_its_defaults(data, file_method, overridden)
    for key in overridden:  # a line from the file would point at the overridden value
        lines.pop(key, None)
    return config_from_dict(data, source=str(source), lines=lines, overridden=overridden)


def config_from_dict(data: dict[str, Any], *, source: str | None = None,
                     lines: dict[tuple[str, ...], int] | None = None,
                     overridden: Collection[tuple[str, ...]] = ()) -> TrainConfig:
    """Validate a plain dict into a :class:`TrainConfig` (ConfigError on failure)."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, lines=lines,
                                                  overridden=overridden)) from None


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.dump(), sort_keys=False)


def _check_folder(key: str, value: str | None) -> None:
    """A folder fastpo writes into: absent (created later) or a folder, under folders."""
    if not value:
        return
    path = Path(value).expanduser()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == path else f"is under {parent}, a file"
                raise ConfigError(f"{key}: {value} {what}; expected a folder (created if "
                                  "missing)")
            return


def _check_file(key: str, value: str | None, what: str) -> None:
    if value and not Path(value).expanduser().exists():
        raise ConfigError(f"{key}: {what} {value} does not exist")


def check_paths(cfg: TrainConfig) -> None:
    """Before a job starts: the files it reads exist, the folders it writes are folders (or
    can be made) and its trackers are installed. Raises a :class:`ConfigError` naming the key
    and the path; model folders are checked by ``model_loading.check_model_path``, file
    contents when they are read."""
    log, ckpt = cfg.logging, cfg.checkpoint
    _check_folder("logging.output_dir", log.output_dir)
    _check_folder("checkpoint.dir", ckpt.dir)
    _check_folder("checkpoint.export_dir", ckpt.export_dir)
    _check_folder("reference.cache_dir", cfg.reference.cache_dir)
    _check_folder("data.cache_dir", cfg.data.cache_dir)
    data = cfg.data
    if data.mixture is not None:
        for i, entry in enumerate(data.mixture):
            for path in entry.paths():
                _check_file(f"data.mixture[{i}].path", path, "preference data")
    for path in data.train_paths() if data.mixture is None else ():
        _check_file("data.train", path, "preference data")
    for path in data.eval_paths():
        _check_file("data.eval", path, "preference data")
    _check_file("deepspeed.config_file", cfg.deepspeed.config_file, "DeepSpeed config")
    from .trackers import check_trackers

    check_trackers(cfg)
    from .model_loading import check_model_path

    for key, value, tokenizer in (("model.name_or_path", cfg.model.name_or_path, False),
                                  ("model.tokenizer", cfg.model.tokenizer, True),
                                  ("reference.name_or_path", cfg.reference.name_or_path, False)):
        if value:
            check_model_path(value, key=key, tokenizer=tokenizer)
