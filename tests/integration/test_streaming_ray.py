"""Two peers trained end to end on each streamed layout (mini-WebVision, Food-101N, image folder) on a real local
Ray: real JPEG fixtures, one Ray Train worker per peer, each decoding in its own loader process, 1 epoch."""

from __future__ import annotations

import json
import math
import os

import pytest

from cmd_dist.config import load_config
from tests.conftest import REPO
from tests.image_fixtures import make_food101n, make_imagefolder, make_webvision

pytestmark = pytest.mark.ray

LAYOUTS = {
    # dataset, fixture, extra overrides, expected noise rate (None: unknown), expected skipped images
    # mini-WebVision also runs each peer as 2 DDP replicas (4 workers): each decodes only its slice of a batch.
    "webvision": (
        lambda r: make_webvision(r, classes=3, per_class=8, corrupt=True),
        ["data.num_classes=3", "ray.replicas_per_peer=2", "ray.cpus_per_worker=0.5", "train.batch_size=7"],
        None,
        1,
    ),
    "food101n": (make_food101n, [], 0.5, 0),
    "imagefolder": (make_imagefolder, ["noise.kind=symmetric", "noise.rate=0.4"], "realised", 0),
}


@pytest.mark.parametrize("dataset", list(LAYOUTS))
def test_two_peers_train_on_a_streamed_layout(ray_cluster, tmp_path, dataset):
    from cmd_dist.launch import job
    from cmd_dist.launch.preflight import preflight

    make, extra, rate, skipped = LAYOUTS[dataset]
    root = make(tmp_path / "data")
    overrides = [
        f"data.dataset={dataset}",
        f"data.root={root}",
        "data.image_size=32",
        "data.workers=1",
        "noise.kind=none",
        "train.epochs=1",
        "train.batch_size=6",  # webvision: 7
        "train.log_every=0",
        f"output_dir={tmp_path / 'runs'}",
        "run_name=stream",
        *extra,
    ]
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"), overrides)
    preflight(cfg, echo=False)
    run_dir = job.resolve_run_dir(cfg)
    summary = job.train(cfg, run_dir)
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["eval_split"] == "test" and not summary["stopped"]
    assert [p["name"] for p in summary["peers"]] == ["peerA", "peerB"]
    assert all(0.0 <= p["test_acc"] <= 100.0 for p in summary["peers"])
    assert summary["skipped_images"] == skipped
    if rate is None:
        assert summary["noise_rate"] is None  # WebVision: no clean labels known
        assert all(p["train_acc_clean"] is None for p in summary["peers"])  # nothing to measure memorisation on
    elif rate == "realised":
        assert 0.1 < summary["noise_rate"] < 0.7
    else:
        assert math.isclose(summary["noise_rate"], rate)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["peer"] for r in rows) == ["peerA", "peerB"]
    ranks = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["peers"] for w in ranks] == [[0], [1]]  # one Ray Train worker per peer (replica 0)
    if dataset == "webvision":  # ImageNet val is the test set; WebVision's own val set is scored beside it
        replicas = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (2, 3)]
        assert [(w["peers"], w["replica"]) for w in replicas] == [([0], 1), ([1], 1)]
        assert all(0.0 <= p["other_acc"]["webvision_val"] <= 100.0 for p in summary["peers"])
        assert all("webvision_val_acc" in r for r in rows)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tb = EventAccumulator(str(run_dir / "tb" / "peerA"))
        tb.Reload()
        assert {"test/acc", "webvision_val/acc"} <= set(tb.Tags()["scalars"])
