"""The checks before Ray starts that need the data, shared by ``cmd-dist train`` and ``cmd-dist tune`` (no Ray)."""

from __future__ import annotations

from cmd_dist.config import Config, ConfigError
from cmd_dist.data.prepare import check_data


def preflight(cfg: Config, echo: bool = True) -> None:
    """Checks that need the data: the files exist and parse, a batch fits the training set, peer weights load.

    Prints the labels trained on and their realised noise rate.
    """
    check = check_data(cfg.data, cfg.noise)
    n_train = check.num_train
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is larger than the {n_train} training images; "
            f"use at most {n_train}"
        )
    last, replicas = n_train % cfg.train.batch_size, cfg.ray.replicas_per_peer
    if 0 < last < replicas:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} leaves a last batch of {last} of the {n_train} training images, "
            f"fewer than ray.replicas_per_peer={replicas} can split; choose another train.batch_size"
        )
    from cmd_dist.models import check_peer_weights

    check_peer_weights(cfg)
    if echo:
        print(f"cmd-dist: {check.line()}", flush=True)
