"""Typed run configuration: defaults in code, one YAML per experiment, ``key=value`` overrides.

- :mod:`~cmd_dist.config.schema`: the sections as dataclasses (every key, its type, default and meaning);
- :mod:`~cmd_dist.config.load`: YAML and overrides in, a validated :class:`Config` out (and back to YAML);
- :mod:`~cmd_dist.config.checks`: the semantic checks, one function per section;
- :mod:`~cmd_dist.config.resume`: what ``--resume`` may change (:data:`RESUME_KEYS`) and what changed.

The names below are the package's interface; import them from ``cmd_dist.config``.
"""

from cmd_dist.config.checks import UNSET_RATE_KINDS, validate
from cmd_dist.config.load import dump_yaml, from_dict, load_config, parse_overrides, yaml_problem
from cmd_dist.config.resume import RESUME_KEYS, config_changes, resume_key_kind
from cmd_dist.config.schema import (
    TRI_STATE,
    Config,
    DataConfig,
    MethodConfig,
    NoiseConfig,
    PaperConfig,
    PeerConfig,
    RayConfig,
    TrainConfig,
    TriState,
)
from cmd_dist.errors import ConfigError

__all__ = [
    "RESUME_KEYS",
    "TRI_STATE",
    "UNSET_RATE_KINDS",
    "Config",
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "NoiseConfig",
    "PaperConfig",
    "PeerConfig",
    "RayConfig",
    "TrainConfig",
    "TriState",
    "config_changes",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_overrides",
    "resume_key_kind",
    "validate",
    "yaml_problem",
]
