"""Typed YAML configs: nested dataclasses filled from YAML files with ``_base_`` includes and dotted overrides.

Generic over the schema, so classification, detection and segmentation share it::

    cfg = load_config("configs/classification/resnet50d_8xb128_efficient_imagenet.yaml", Config,
                      ["optim.lr=0.2", "train.epochs=90"])
    dump_config(cfg, f"{cfg.output_dir}/config.yaml")

Layers are applied in order (the file's bases depth-first, the file itself, then each override); a section
given in a later layer updates only the keys it names, any other value is replaced. Every layer is checked
against the schema on its own, so an error names the file (and line) or the override it came from.
Supported annotations: ``int``, ``float`` (accepts ints), ``bool``, ``str``, ``Optional[X]`` / ``X | None``,
``list[X]``, ``dict[str, X]`` (merged key by key across layers), ``Literal[...]``, ``Any`` and nested dataclasses (sections).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import UserError

T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(UserError, ValueError):
    """A config file or override does not fit the schema; the message says where and what to do."""


# ---------------------------------------------------------------------------------------------- YAML dialect
# PyYAML implements YAML 1.1, where a float needs a dot: `1e-4` would be the *string* "1e-4". Configs are full
# of such learning rates and weight decays, so loader and dumper also resolve the YAML 1.2 forms as floats
# (the dumper must agree, or it would write the string "1e-4" unquoted and it would come back as a float).
_FLOAT = re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class _Loader(yaml.SafeLoader):
    """SafeLoader reading `1e-4` as a float, recording the line of each key and rejecting duplicate keys."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings `_Loader` would read as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
# Sections as blocks, short lists of scalars inline: `milestones: [30, 60, 90]`.
_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=not any(isinstance(v, (dict, list)) for v in value)))


class _Mapping(dict):
    """A YAML mapping that knows the line (1-based) of each of its keys."""

    def __init__(self, *args, lines: Mapping[str, int] | None = None):
        super().__init__(*args)
        self.lines = dict(lines or {})


def _construct_mapping(loader: _Loader, node: yaml.MappingNode):
    mapping = _Mapping()
    yield mapping  # yield first, like PyYAML's own constructor, so recursive anchors work
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        if key_node.value in mapping.lines:
            # PyYAML silently keeps the last of two equal keys; in a config that hides a whole section.
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key_node.value!r} (first on line {mapping.lines[key_node.value]})",
                key_node.start_mark)
        mapping.lines[key_node.value] = key_node.start_mark.line + 1
    mapping.update(loader.construct_mapping(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


# ---------------------------------------------------------------------------------------------- public API
def load_config(path: str | os.PathLike | None, schema_cls: type[T], overrides: Iterable[str] = ()) -> T:
    """Build a ``schema_cls`` from its defaults, the YAML file at ``path`` (if any) and dotted overrides.

    ``path`` may name bases with ``_base_: other.yaml`` or a list of them, resolved relative to the including
    file and applied in order before the file's own keys. ``overrides`` are ``"a.b.c=value"`` strings whose
    value is parsed as YAML (``1e-4``, ``[30, 60]``, ``null``, ``true``). Raises ``ConfigError`` on unknown
    keys, wrong types, disallowed ``Literal`` values, missing or cyclic bases and invalid YAML.
    """
    if isinstance(overrides, str):  # a lone string would be applied character by character
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    cfg = schema_cls()
    if path is not None:
        for source, layer in _file_layers(Path(path), ()):
            cfg = _apply(cfg, _check_section(schema_cls, layer, source, "", schema_cls))
    for text in overrides:
        source = f"command line override {text!r}"
        cfg = _apply(cfg, _check_section(schema_cls, _parse_override(text, source), source, "", schema_cls))
    check_bounds(cfg)
    return cfg


_BOUND = re.compile(r"^\s*(>=|>)\s*(-?[\d.e-]+)\s*$")
_INTERVAL = re.compile(r"^\s*([\[(])\s*(-?[\d.e-]+)\s*,\s*(-?[\d.e-]+)\s*([\])])\s*$")
_CHOICES = re.compile(r"^\s*\{(.*)\}\s*$")


def _within(value: float, rule: str) -> bool:
    if m := _BOUND.match(rule):
        return value >= float(m[2]) if m[1] == ">=" else value > float(m[2])
    if m := _INTERVAL.match(rule):
        lo, hi = float(m[2]), float(m[3])
        return (value >= lo if m[1] == "[" else value > lo) and (value <= hi if m[4] == "]" else value < hi)
    if m := _CHOICES.match(rule):
        return value in [float(v) for v in m[1].split(",")]
    raise ValueError(f"config bound {rule!r}: write '>= a', '> a', an interval '[a, b)' or choices '{{a, b}}'")


_SHAPE = re.compile(r"^\s*(ascending\s+)?(pair|nonempty)?\s*(.*)$")
_RELATIONS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b}


def _get(cfg: Any, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        if not hasattr(value, part):
            raise KeyError(f"config bounds name {key!r}, which {type(cfg).__name__} does not have")
        value = getattr(value, part)
    return value


def check_bounds(cfg: Any, bounds: Mapping[str, str] | None = None,
                 relations: Sequence[tuple[str, str, str]] | None = None) -> None:
    """The numeric ranges of a config: ``bounds`` (default: the schema's ``BOUNDS``) maps dotted keys to ``">= a"``,
    ``"> a"``, an interval (``"[a, b]"``, ``"[a, b)"``, ``"(a, b]"``, ``"(a, b)"``) or choices (``"{8, 16, 32}"``).
    ``None`` passes; a list is checked element by element, and the rule may first say its shape: ``"pair ..."``
    (exactly two elements), ``"nonempty ..."`` (at least one), ``"ascending ..."`` (non-decreasing).
    ``relations`` (default: the schema's ``RELATIONS``) are ``(key, "<" or "<=", other key)`` between two keys,
    element by element for lists. A value outside is a ``ConfigError`` naming the key(s), the value(s) and the rule;
    a key the config lacks is a programming error (``KeyError``). ``load_config`` calls it once every layer is
    applied; each engine calls it again, for configs built in code."""
    bounds = getattr(type(cfg), "BOUNDS", {}) if bounds is None else bounds
    relations = getattr(type(cfg), "RELATIONS", ()) if relations is None else relations
    for key, rule in bounds.items():
        value = _get(cfg, key)
        if value is None:
            continue
        ascending, shape, element_rule = _SHAPE.match(rule).groups()
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if (shape == "pair" and len(items) != 2) or (shape == "nonempty" and not items) or \
                (shape and not isinstance(value, (list, tuple))):
            raise ConfigError(f"{key}={value}: must be {'a pair [a, b]' if shape == 'pair' else 'a non-empty list'}"
                              f"{', ascending' if ascending else ''}, each {element_rule.strip()}")
        if ascending and items != sorted(items):
            raise ConfigError(f"{key}={value}: must be in ascending order")
        for item in items:
            if item is not None and not _within(item, element_rule):
                raise ConfigError(f"{key}={value}: must be {element_rule.strip()}")
    for key, op, other in relations:
        a, b = _get(cfg, key), _get(cfg, other)
        if a is None or b is None:
            continue
        pairs = list(zip(a, b)) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else [(a, b)]
        if not all(_RELATIONS[op](x, y) for x, y in pairs):
            raise ConfigError(f"{key}={a}: must be {op} {other}={b}"
                              f"{' (element by element)' if len(pairs) > 1 else ''}")


def read_top_level(path: str | os.PathLike | None, overrides: Iterable[str], key: str) -> Any:
    """The value of top-level ``key`` after the file's bases, the file and the overrides (``None`` if unset),
    read before any schema is chosen: ``tricks train`` picks the task's schema from ``task``."""
    value = None
    layers = _file_layers(Path(path), ()) if path is not None else []
    layers += [(text, _parse_override(text, f"command line override {text!r}")) for text in overrides]
    for _, layer in layers:
        if key in layer:
            value = layer[key]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (a deep copy)."""
    return dataclasses.asdict(cfg)


def format_config(cfg: Any) -> str:
    """The config as YAML text, fields in schema order; ``load_config`` reads it back to an equal object."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config as YAML to ``path`` (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_config(cfg), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- layers
def _file_layers(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, Mapping]]:
    """(source name, mapping) of the file's bases, depth-first and in order, then of the file itself."""
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: cyclic {BASE_KEY} include: {names}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder: give a config file (a .yaml in it, or in configs/)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _read_yaml(path)
    if data is None:  # an empty file is an empty layer
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {_describe(data)}")
    data = _Mapping(data, lines=getattr(data, "lines", {}))  # a copy: `_base_` is removed below
    bases = data.pop(BASE_KEY, [])
    where = _where(str(path), data, BASE_KEY)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{where}: {BASE_KEY} must be a path or a list of paths, got {_describe(bases)}")
    layers = []
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))
        if not base_path.is_file():
            raise ConfigError(f"{where}: {BASE_KEY} {base!r} not found (looked for {base_path})")
        layers += _file_layers(base_path, (*chain, path.resolve()))
    return [*layers, (str(path), data)]


def _parse_override(text: str, source: str) -> dict[str, Any]:
    """``"a.b=1"`` -> ``{"a": {"b": 1}}``."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{source}: expected key=value with a dotted key, e.g. optim.lr=0.2")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: the value is not valid YAML: {e}") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def _apply(cfg: T, values: Mapping[str, Any]) -> T:
    """``cfg`` with checked, possibly partial ``values`` applied; sections are updated, not replaced."""
    changes = {}
    for name, value in values.items():
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            changes[name] = _apply(current, value)
        elif isinstance(current, dict) and isinstance(value, dict):  # free-form mappings merge key by key
            changes[name] = {**current, **value}
        else:
            changes[name] = value
    # replace() rather than setattr: works for frozen schemas. It re-runs __init__ per layer, so cross-field
    # checks belong after load_config, not in __post_init__ (which would see half-applied layers).
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------- checking
@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation; get_type_hints evaluates `from __future__ import annotations`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _all_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    keys = []
    for name, tp in _fields(cls).items():
        keys.append(prefix + name)
        if _is_section(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
    return tuple(keys)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _where(source: str, mapping: Mapping, key: Any) -> str:
    line = getattr(mapping, "lines", {}).get(key)
    return f"{source}, line {line}" if line else source


def _check_section(cls: type, data: Mapping, source: str, prefix: str, root: type) -> dict[str, Any]:
    """Check one layer's keys and values against section ``cls``; return the values converted to their types."""
    fields = _fields(cls)
    checked = {}
    for key, value in data.items():
        dotted, where = f"{prefix}{key}", _where(source, data, key)
        if key not in fields:
            hint = _suggest(str(key), prefix, fields, root)
            raise ConfigError(
                f"{where}: unknown key '{dotted}'" + (f"; did you mean '{hint}'?" if hint else "") +
                f" Valid keys in {f'section {prefix[:-1]!r}' if prefix else 'the top level'}: {', '.join(fields)}")
        tp = fields[key]
        if _is_section(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: '{dotted}' is a section and needs a mapping of its keys "
                                  f"({', '.join(_fields(tp))}), got {_describe(value)}")
            checked[key] = _check_section(tp, value, source, f"{dotted}.", root)
        else:
            checked[key] = _convert(value, tp, dotted, where)
    return checked


def _suggest(key: str, prefix: str, fields: Mapping[str, Any], root: type) -> str | None:
    """The valid dotted key the user most likely meant, or None."""
    everywhere = _all_keys(root)
    # The right name in the wrong section (`train.lr`) is a common slip: point at the section that has it.
    moved = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
    if moved:
        return moved[0]
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return prefix + close[0]
    close = difflib.get_close_matches(prefix + key, everywhere, n=1)
    return close[0] if close else None


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` checked against annotation ``tp`` (ints widened to float); ConfigError naming ``key`` if not."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:  # Optional[X]: X's own error is the most precise
            return _convert(value, options[0], key, where)
        for option in options:
            try:
                return _convert(value, option, key, where)
            except ConfigError:
                pass
    elif origin is Literal:
        # Compare types too: YAML `1` must not pass for Literal[True], nor `true` for Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        allowed = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{where}: '{key}' must be one of {allowed}; got {_describe(value)}")
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            item = args[1] if args else Any
            return {k: _convert(v, item, f"{key}.{k}", where) for k, v in value.items()}
    elif origin is list or tp is list:
        if isinstance(value, list):
            item = args[0] if args else Any
            return [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp in (int, bool, str):
        if type(value) is tp:  # exact type: bool is a subclass of int, and `true` is no epoch count
            return value
    else:
        raise TypeError(f"schema field '{key}' has an unsupported annotation {tp!r}")
    raise ConfigError(f"{where}: '{key}' expects {_type_name(tp)}, got {_describe(value)}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(tp, "__name__", repr(tp))


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"
