"""Reading a run configuration: defaults in code < one YAML file (a path or a filesystem URI) < ``key=value``
overrides, built into the typed :class:`~cmd_dist.config.schema.Config` and validated.

Every user mistake raises :class:`ConfigError` with a one-line message that names the key, the bad value and what
is allowed; the CLI prints it and exits with code 2 before Ray starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config.checks import UNSET_RATE_KINDS, validate
from cmd_dist.config.schema import TRI_STATE, Config, NoiseConfig
from cmd_dist.errors import ConfigError, first_line

# ----------------------------------------------------------------------------- parsing

_FLOAT_RE = re.compile(r"^[+-]?((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|\.?inf)$", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return _literal(key, value, args)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads 1e-3 and 5e-4 (no dot) and inf as strings; they are numbers here.
            if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
                return float(value.strip().lower().replace(".inf", "inf"))
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _literal(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``. A tri-state (auto / true / false) takes YAML's booleans and any case of its words, so
    ``true``, ``"true"`` and ``"True"`` are the same value: ``"true"``."""
    if set(TRI_STATE) <= set(allowed):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and value.lower() in TRI_STATE:
            return value.lower()
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, one of {', '.join(allowed)}; got {value!r}")
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            allowed = ", ".join(prefix + n for n in names)
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; allowed: {allowed}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} has no item {part!r}")
            node = node[int(part)]
        else:
            if part not in node or not isinstance(node[part], (dict, list)):
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {dotted!r}")
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: no item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line naming the line and column of a YAML syntax error and what is wrong there."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or first_line(e)
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings to (key, value) pairs; values are parsed as YAML (``peers=[{arch: x}]``)."""
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. method.eta=3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file < overrides, then validation. Raises ConfigError on any mistake."""
    tree = Config().to_dict()
    loaded: dict[str, Any] = {}
    if path is not None:
        shown, text = _config_text(path)
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {shown!r} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {shown!r} must hold a mapping of keys")
        tree = _merge(tree, loaded)
    parsed = parse_overrides(overrides or [])
    for key, value in parsed:
        _set_path(tree, key, value)
    cfg = from_dict(tree)
    _check_rate_used(
        cfg, tree["noise"].get("rate"), _noise_layer(loaded, parsed, "rate"), _noise_layer(loaded, parsed, "kind")
    )
    return cfg


def _config_text(path: str | Path) -> tuple[str, str]:
    """(the name to show, the text) of a config file: a local file, or a filesystem URI (e.g. a search's
    ``s3://bucket/runs/tune-.../best.yaml``, read through pyarrow)."""
    if "://" in str(path):
        from cmd_dist.runs.fs import Remote, open_filesystem, split_location

        uri = str(path)
        parent, name = split_location(uri)
        fs, root = open_filesystem(parent, key=f"config file {uri!r}")
        try:
            data = Remote(fs, root, parent).read_bytes(name)
        except OSError as e:
            raise ConfigError(f"config file {uri!r}: cannot read it ({first_line(e)})") from None
        if data is None:
            raise ConfigError(f"config file {uri!r} not found")
        return uri, data.decode(errors="replace")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    return str(p), p.read_text()


def from_dict(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _noise_layer(loaded: dict[str, Any], parsed: list[tuple[str, Any]], key: str) -> int:
    """The last layer that set ``noise.<key>``: 0 the defaults, 1 the config file, 2 an override."""
    if any(k == f"noise.{key}" for k, _ in parsed):
        return 2
    noise = loaded.get("noise")
    if key == "rate" and isinstance(noise, dict) and set(noise) >= {f.name for f in dataclasses.fields(NoiseConfig)}:
        return 0  # a resolved config.yaml (every noise key), e.g. an older run's with kind human and rate 0.4
    return 1 if isinstance(noise, dict) and key in noise else 0


def _check_rate_used(cfg: Config, rate: Any, rate_layer: int, kind_layer: int) -> None:
    """``noise.rate`` given with (or after) a ``noise.kind`` that adds no synthetic noise: an error (a CIFAR-N
    label set fixes its own rate). A rate from an earlier layer (``demo.yaml``'s 0.4, then ``noise.kind=none``)
    is dropped, and 0 is accepted, as resolved configs write it."""
    if rate_layer and rate_layer >= kind_layer and cfg.noise.kind in UNSET_RATE_KINDS and rate != 0:
        raise ConfigError(
            f"noise.rate: {rate} is not used with noise.kind={cfg.noise.kind} (no synthetic noise: the realised "
            f"rate is measured and written to summary.json); remove noise.rate"
        )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
