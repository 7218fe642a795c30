"""Search spaces for ``cmd-dist tune``: a YAML file of config keys and distributions, checked before Ray starts.

The file has a ``space`` mapping (dotted config key -> distribution) and an optional ``start`` list of
points evaluated first, e.g. the paper's default, so a short search is never worse than not searching::

    space:
      method.b2: {distribution: uniform, low: -20, high: 20}
      train.lr: {distribution: choice, values: [0.02, 0.05, 0.1]}
    start:
      - {method.b2: -8}

Distributions: ``uniform`` and ``loguniform`` (floats in [low, high]), ``randint`` (integers, both ends
included) and ``choice`` (``values``). ``grid`` (default 3) is how many evenly spaced points a range
gives ``--algo grid``. Every mistake is a :class:`ConfigError` naming the file, the key and the fix.
This module is pure (no Ray) so the checks run, and are tested, before any cluster exists.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmd_dist.config import Config, ConfigError, from_dict, yaml_problem

DEFAULT_SPACE = Path(__file__).resolve().parent / "space.yaml"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
RANGE_FIELDS = {"distribution", "low", "high", "grid"}
CHOICE_FIELDS = {"distribution", "values"}
DEFAULT_GRID_POINTS = 3
#: Keys a search may not vary: trials always use the search protocol, and where runs go and what
#: resources they get is the search's business, not a hyperparameter.
FIXED_PREFIXES = ("data.protocol", "output_dir", "run_name", "ray.")


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    key: str
    distribution: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] = ()
    grid: int = DEFAULT_GRID_POINTS

    def grid_values(self) -> list[Any]:
        """The points ``--algo grid`` tries: all choices, or ``grid`` evenly spaced points of the range."""
        if self.distribution == "choice":
            return list(self.values)
        assert self.low is not None and self.high is not None
        n = self.grid
        if self.distribution == "randint":
            return sorted({round(self.low + (self.high - self.low) * i / (n - 1)) for i in range(n)})
        if self.distribution == "loguniform":
            lo, hi = math.log(self.low), math.log(self.high)
            return [float(math.exp(lo + (hi - lo) * i / (n - 1))) for i in range(n)]
        return [float(self.low + (self.high - self.low) * i / (n - 1)) for i in range(n)]

    def describe(self) -> str:
        if self.distribution == "choice":
            return f"choice {list(self.values)}"
        return f"{self.distribution} [{self.low}, {self.high}]"


@dataclass
class SearchSpace:
    params: list[Param]
    start: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the grid points, in a fixed order."""
        combos = itertools.product(*(p.grid_values() for p in self.params))
        return [dict(zip(self.keys, combo, strict=True)) for combo in combos]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form, so a resumed search can rebuild exactly this space."""
        space = {}
        for p in self.params:
            if p.distribution == "choice":
                space[p.key] = {"distribution": "choice", "values": list(p.values)}
            else:
                space[p.key] = {"distribution": p.distribution, "low": p.low, "high": p.high, "grid": p.grid}
        return {"space": space, "start": [dict(s) for s in self.start]}


# ----------------------------------------------------------------------------- config keys


def lookup(tree: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (``peers.0.arch`` indexes lists); KeyError when the config lacks it."""
    node: Any = tree
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(key)
    return node


def assign(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key that :func:`lookup` found (in place)."""
    *parents, last = key.split(".")
    node: Any = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The config one trial trains: the user's config, the sampled values, and always the search protocol.

    Forcing ``data.protocol=search`` here (not only in the CLI) is what keeps the test split out of
    every trial: the search protocol splits the training set into noisy train and clean validation.
    """
    tree = copy.deepcopy(base)
    for key, value in params.items():
        assign(tree, key, plain_value(value))
    tree["data"]["protocol"] = "search"
    return from_dict(tree)


def final_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The best trial's values on the user's config, with the final protocol (all training data, test)."""
    tree = copy.deepcopy(base)
    for key, value in params.items():
        assign(tree, key, plain_value(value))
    tree["data"]["protocol"] = "final"
    return from_dict(tree)


def plain_value(value: Any) -> Any:
    """numpy scalars (what samplers return) to Python numbers, so configs and YAML stay plain."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


# ----------------------------------------------------------------------------- parsing


def _number(where: str, name: str, value: Any, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}: {name} must be {kind}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {name} must be finite, got {value!r}")
    return value


def parse_param(key: str, spec: Any, where: str) -> Param:
    """One ``key: {distribution: ..., ...}`` entry; errors name the key and what is allowed."""
    where = f"{where}: {key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping like {{distribution: uniform, low: 1, high: 8}}, got {spec!r}")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: distribution {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    allowed = CHOICE_FIELDS if dist == "choice" else RANGE_FIELDS
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} for {dist}; allowed: {', '.join(sorted(allowed))}")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: choice needs a non-empty list of values, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}: choice values {values} repeat a value")
        return Param(key, dist, values=tuple(values))
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"{where}: {dist} needs low and high (missing {name})")
    integer = dist == "randint"
    low = _number(where, "low", spec["low"], integer)
    high = _number(where, "high", spec["high"], integer)
    if low >= high:
        raise ConfigError(f"{where}: empty or inverted range: low {low} must be below high {high}")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
    grid = spec.get("grid", DEFAULT_GRID_POINTS)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ConfigError(f"{where}: grid must be an integer >= 2 (points per range), got {grid!r}")
    return Param(key, dist, low=low, high=high, grid=grid)


def _check_key(key: str, base: dict[str, Any], where: str) -> None:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: keys must be dotted config keys like method.eta, got {key!r}")
    if any(key == p or (p.endswith(".") and key.startswith(p)) for p in FIXED_PREFIXES):
        raise ConfigError(
            f"{where}: {key} cannot be searched (the search sets data.protocol, output_dir, run_name and ray.*)"
        )
    try:
        value = lookup(base, key)
    except KeyError:
        raise ConfigError(
            f"{where}: {key!r} is not a key of the config (e.g. method.b1, method.b2, method.eta, train.lr)"
        ) from None
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: {key!r} is a section of the config; name one value in it")


def _check_values(param: Param, base: dict[str, Any], where: str) -> None:
    """Each end of a range and each choice must make a valid trial config (types, allowed values)."""
    probes = list(param.values) if param.distribution == "choice" else [param.low, param.high]
    for value in probes:
        try:
            trial_config(base, {param.key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: {param.key}={value!r} is not a valid config: {e}") from None


def parse_space(raw: Any, base: dict[str, Any], where: str = "search space") -> SearchSpace:
    """Check a loaded space YAML against the config it will vary (``base``: ``Config.to_dict()``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'space' (and optionally 'start')")
    unknown = sorted(set(raw) - {"space", "start"})
    if unknown:
        raise ConfigError(f"{where}: unknown section {unknown[0]!r}; allowed: space, start")
    entries = raw.get("space")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{where}: 'space' must map at least one config key to a distribution")
    params = []
    for key, spec in entries.items():
        _check_key(key, base, where)
        param = parse_param(key, spec, where)
        _check_values(param, base, where)
        params.append(param)
    start = raw.get("start") or []
    if not isinstance(start, list):
        raise ConfigError(f"{where}: 'start' must be a list of points like {{method.eta: 2}}")
    keys = {p.key for p in params}
    for i, point in enumerate(start):
        if not isinstance(point, dict) or not point:
            raise ConfigError(f"{where}: start[{i}] must be a mapping of searched keys to values, got {point!r}")
        extra = sorted(set(point) - keys)
        if extra:
            raise ConfigError(f"{where}: start[{i}] sets {extra[0]!r}, which is not in the space")
        missing = sorted(keys - set(point))
        if missing:
            raise ConfigError(f"{where}: start[{i}] must give every searched key; missing {missing[0]!r}")
        try:
            trial_config(base, point)
        except ConfigError as e:
            raise ConfigError(f"{where}: start[{i}] is not a valid config: {e}") from None
    return SearchSpace(params, [dict(p) for p in start], where)


def load_space(path: str | Path | None, base: dict[str, Any]) -> SearchSpace:
    """Read and check a space YAML (default ``tune/space.yaml``)."""
    p = Path(path) if path else DEFAULT_SPACE
    if not p.is_file():
        raise ConfigError(f"search space file {str(p)!r} not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"search space file {str(p)!r} is not valid YAML: {yaml_problem(e)}") from None
    return parse_space(raw, base, where=f"search space {p}")
