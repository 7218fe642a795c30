"""`cmd-dist evaluate RUN --address ADDR`: the evaluation runs in a Ray task on the cluster (the session's shared
local Ray) and gives the in-process numbers; a user error inside the task comes back as the same one line."""

from __future__ import annotations

import os

import pytest

from cmd_dist.errors import CheckpointError
from cmd_dist.infer.evaluate import evaluate_run
from tests.unit.infer.conftest import trained_run  # noqa: F401 - the tiny run, trained once per session


@pytest.mark.ray
def test_evaluate_on_the_cluster_is_a_ray_task_with_the_same_numbers(trained_run, ray_cluster, capsys):  # noqa: F811
    from cmd_dist import cli
    from cmd_dist.launch.evaluate import evaluate_on_cluster

    address = ray_cluster.get_runtime_context().gcs_address
    result = evaluate_on_cluster(address, trained_run.as_uri(), "last")
    assert result["pid"] != os.getpid() and result["node"]  # ran in a Ray worker, not here
    assert result["models"] == evaluate_run(str(trained_run), "last")["models"]
    with pytest.raises(CheckpointError, match="checkpoint_000009 does not exist; this run has: best, 3, 2"):
        evaluate_on_cluster(address, str(trained_run), "9")
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", str(trained_run), "--checkpoint", "9", "--address", address])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
