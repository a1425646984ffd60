"""Typed configs: plain mappings (YAML files, JSON, dotted overrides) -> frozen dataclasses, strictly checked.

Every config dataclass in shapeflow (model configs next to their model, the training engine's configs in
:mod:`shapeflow.train.experiment`, data and loss configs next to their task) is built through
:func:`build`, so the rules below hold everywhere, for experiment files and checkpoints alike.

Design choices:

* Strict: an unknown key (with a "did you mean" hint), a wrong type, a missing required key or a bad
  ``Literal`` choice is a :class:`ConfigError` (a ``ValueError``) whose one-line message names the source
  (file or command-line override) and the dotted key, e.g.
  ``configs/x.yaml: model.widht: unknown key (did you mean width?)``.
* Supported field types: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``Optional[...]``,
  ``Literal[...]``, ``tuple[X, ...]``/``tuple[X, Y]``/``list[X]``, ``dict[str, X]``, nested
  dataclasses, and ``Any`` (passed through). ``bool`` is never accepted for ``int``/``float``.
* **Presets, in one place:** a config class may carry ``PRESETS: ClassVar[dict[str, dict]]``; a ``preset``
  key in the data expands to that entry first (preset < the other keys < overrides). :func:`preset`
  does the same from Python.
* YAML is read with a loader that also parses ``3e-4`` as a float (plain YAML 1.1 reads it as a
  string). Overrides ``a.b=value`` parse ``value`` as YAML; for ``str`` fields the raw text is used, so
  ``model.name=123`` gives the string ``"123"``. ``null``/``~``/``None`` set an ``Optional`` to None.
* :func:`to_dict` gives the JSON form saved with every checkpoint (every field explicit); building from
  it again with ``note_missing=True`` gives keys an older file lacks their defaults with a log line,
  never silently.

This module knows no model, task or file layout; it only turns mappings into dataclasses.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "Sources",
    "build",
    "preset",
    "from_dict",
    "to_dict",
    "read_yaml",
    "parse_overrides",
    "apply_overrides",
    "section",
    "convert",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming source and key."""


# =================================================================================================
# YAML and overrides
# =================================================================================================


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4``/``3E+2`` (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class _Override:
    """A command-line value: the raw text (used for str fields) and its YAML parse (everything else)."""

    text: str
    value: Any


def parse_overrides(items: Sequence[str]) -> list[tuple[str, _Override, str]]:
    """Parse ``["a.b=1", ...]`` into ``(dotted_key, value, source)`` triples (raises ConfigError)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected key=value with a dotted key, e.g. train.lr=3e-4")
        out.append((key, _Override(text, _yaml_value(text)), f"override '{item}'"))
    return out


# =================================================================================================
# Typed conversion
# =================================================================================================


class Sources:
    """Where each dotted key came from, for error messages (default: the YAML file)."""

    def __init__(self, default: str, by_key: Mapping[str, str] | None = None):
        self.default = default
        self.by_key = dict(by_key or {})

    def of(self, key: str) -> str:
        # the longest prefix that has an explicit source (an override of a whole section counts)
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            src = self.by_key.get(".".join(parts[:n]))
            if src is not None:
                return src
        return self.default

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.of(key)}: {key}: {problem}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_none_text(value: Any) -> bool:
    return isinstance(value, _Override) and value.text.strip() in ("None", "null", "~", "")


def convert(value: Any, tp: Any, key: str, src: Sources) -> Any:
    """Return ``value`` checked / converted to the annotation ``tp`` (tuples from lists, etc.)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value.value if isinstance(value, _Override) else value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or _is_none_text(value)):
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return convert(value, options[0], key, src)
        for arg in options:
            try:
                return convert(value, arg, key, src)
            except ConfigError:
                pass
        raw = value.value if isinstance(value, _Override) else value
        raise src.error(key, f"expected {_type_name(tp)}, got {raw!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        raw = value.text if isinstance(value, _Override) and all(isinstance(c, str) for c in choices) else (
            value.value if isinstance(value, _Override) else value)
        if raw not in choices:
            raise src.error(key, f"{raw!r} is not one of {', '.join(repr(c) for c in choices)}")
        return raw
    if dataclasses.is_dataclass(tp):
        raw = value.value if isinstance(value, _Override) else value
        if dataclasses.is_dataclass(raw) and isinstance(raw, tp):
            return raw
        if not isinstance(raw, Mapping):
            raise src.error(key, f"expected a mapping for {tp.__name__}, got {raw!r}")
        return _build(tp, raw, key, src)
    if tp is str:
        if isinstance(value, _Override):
            return value.text
        if not isinstance(value, str):
            raise src.error(key, f"expected str, got {type(value).__name__} {value!r}")
        return value
    raw = value.value if isinstance(value, _Override) else value
    if tp is bool:
        if not isinstance(raw, bool):
            raise src.error(key, f"expected bool (true/false), got {raw!r}")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise src.error(key, f"expected int, got {type(raw).__name__} {raw!r}")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise src.error(key, f"expected float, got {type(raw).__name__} {raw!r}")
        return float(raw)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(raw, (list, tuple)):
            raise src.error(key, f"expected a list for {_type_name(tp)}, got {raw!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(raw) != len(args):
                raise src.error(key, f"expected {len(args)} items for {_type_name(tp)}, got {len(raw)}")
            items = [convert(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(raw, args))]
        else:
            item_tp = args[0] if args else Any
            items = [convert(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(raw)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(raw, Mapping):
            raise src.error(key, f"expected a mapping, got {raw!r}")
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in raw.items():
            if not isinstance(k, str):
                raise src.error(key, f"mapping keys must be strings, got {k!r}")
            out[k] = convert(v, val_tp, f"{key}.{k}", src)
        return out
    raise src.error(key, f"unsupported field type {_type_name(tp)} in config class")


def _expand_preset(cls: type, data: dict[str, Any], prefix: str, src: Sources) -> tuple[dict[str, Any], bool]:
    """``data`` with its ``preset`` key replaced by the entry of ``cls.PRESETS`` (other keys win)."""
    key = f"{prefix}.preset" if prefix else "preset"
    name = convert(data.pop("preset"), str, key, src)
    table = getattr(cls, "PRESETS", None) or {}
    if name not in table:
        known = ", ".join(table) if table else "none defined"
        raise src.error(key, f"unknown preset {name!r} for {cls.__name__} (known: {known})")
    for k in table[name]:
        if k not in data:
            src.by_key.setdefault(f"{prefix}.{k}" if prefix else k, f"{src.of(key)} (preset {name!r})")
    return {**table[name], **data}, True


def _build(cls: type, data: Mapping[str, Any], prefix: str, src: Sources, note_missing: bool = False):
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:  # a forward reference the config class's module cannot resolve
        raise ConfigError(f"{cls.__qualname__}: cannot resolve field types ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = dict(data)
    if "preset" in data and "preset" not in fields:
        data, from_preset = _expand_preset(cls, data, prefix, src)
        note_missing = note_missing and not from_preset  # a preset names only what differs from the defaults
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise src.error(key, f"unknown key{hint}")
        kwargs[name] = convert(value, hints[name], key, src)
    for name, f in fields.items():
        if name in kwargs:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise src.error(key, "missing required key")
        if note_missing:
            log.info("%s: %s missing; using the default %r", src.default, key,
                     f.default if f.default is not dataclasses.MISSING else f.default_factory())
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks already name the key
        raise ConfigError(f"{src.of(prefix)}: {e}") from None
    except (TypeError, ValueError) as e:
        raise src.error(prefix or cls.__name__, str(e)) from None


def build(cls: type, data: Mapping[str, Any], *, source: str | Sources = "<dict>", prefix: str = "",
          note_missing: bool = False) -> Any:
    """Strictly build dataclass ``cls`` from a plain mapping (a YAML section, a ``config.json`` section).

    Parameters
    ----------
    data : field values; a ``preset`` key expands ``cls.PRESETS[name]`` first (the other keys win).
    source : where ``data`` came from (a file name), or a :class:`Sources` that also knows per-key sources.
    prefix : dotted key of ``data`` in its document (e.g. ``"model"``), for error messages.
    note_missing : log every field ``data`` lacks (older files) with the default it takes.

    Raises
    ------
    ConfigError (a ``ValueError``) with one line naming the source and the dotted key.
    """
    src = source if isinstance(source, Sources) else Sources(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src.default}: {prefix or cls.__name__}: expected a mapping, got {data!r}")
    return _build(cls, data, prefix, src, note_missing)


def from_dict(cls: type, data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """:func:`build` with a plain source name (kept for call sites that only have a file name)."""
    return build(cls, data, source=source, prefix=prefix)


def preset(cls: type, name: str, **overrides: Any) -> Any:
    """The config ``cls.PRESETS[name]`` with field ``overrides``, e.g. ``preset(VecSetVAEConfig, "tiny")``."""
    return build(cls, {"preset": name, **overrides}, source=f"{cls.__name__} preset {name!r}")


def to_dict(cfg: Any) -> Any:
    """A JSON-ready nested dict of a (nested) dataclass config; tuples become lists.

    Only ``init`` fields are written (derived ``field(init=False)`` values are recomputed on load).
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg




# =================================================================================================
# Documents: YAML files, sections, dotted overrides
# =================================================================================================


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (``{}`` for an empty file).

    Raises FileNotFoundError when missing; ConfigError naming the line for invalid YAML or a non-mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return copy.deepcopy(raw)


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, _Override) and isinstance(child.value, Mapping):
            child = node[part] = dict(child.value)
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: Sequence[str], sources: Sources) -> None:
    """Set each ``a.b=value`` of ``overrides`` in the nested mapping ``tree``, recording its source."""
    for key, value, source in parse_overrides(overrides):
        _set_dotted(tree, key, value, source)
        sources.by_key[key] = source


def section(tree: Mapping[str, Any], name: str, sources: Sources) -> dict[str, Any]:
    """The mapping under ``tree[name]`` (``{}`` when absent or null)."""
    value = tree.get(name)
    value = value.value if isinstance(value, _Override) else value
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise sources.error(name, f"expected a mapping, got {value!r}")
    return dict(value)
