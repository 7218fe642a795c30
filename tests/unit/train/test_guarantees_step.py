"""When the whole-step CUDA graph is recaptured (issue 19, point 0), checked on CPU.

A CUDA graph bakes in Python floats such as each optimizer's learning rate, so :class:`GraphedStep` must
record a new graph whenever a learning rate, the exchange's on/off state or AsyncMKD's stepping peer
changes, and replay the old one otherwise. The decision runs here with the real peers, optimizers and
step schedule; only the recording itself (CUDA) is replaced by a stand-in that notes what was captured.
"""

from __future__ import annotations

import pytest
import torch

from cmd_dist.config import load_config
from cmd_dist.data.types import Batch
from cmd_dist.train.peers import build_peer
from cmd_dist.train.step import GraphedStep

BATCH = 4


class _EagerStep:
    """What GraphedStep needs of a TrainStep: the peers, the exchange switch, the active peer, an eager call."""

    def __init__(self, peers) -> None:
        self.peers = peers
        self.exchanging = True
        self.active = None
        self.eager_calls = 0

    def __call__(self, xs, y, clean, ids, share=1.0) -> None:
        self.eager_calls += 1


class _Graph:
    def __init__(self, lrs) -> None:
        self.lrs = lrs  # what a CUDA graph would have baked in
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def _batch(n: int = BATCH, value: float = 0.0) -> Batch:
    return Batch(
        xs=[torch.full((n, 1, 8, 8), value), torch.full((n, 1, 8, 8), value)],
        y=torch.zeros(n, dtype=torch.long),
        clean=torch.zeros(n, dtype=torch.long),
        ids=torch.arange(n),
    )


def _graphed(monkeypatch):
    cfg = load_config(None, ["train.lr=0.1", "train.milestones=[1, 2]", "train.gamma=0.5"])
    peers = [build_peer(cfg, k, 10, 1, torch.device("cpu"), 8) for k in range(2)]
    step = _EagerStep(peers)
    g = GraphedStep(step, BATCH, warmup=1)
    graphs: list[_Graph] = []

    def capture(batch: Batch) -> None:  # the real one records the step on a CUDA stream
        g.static = {"xs": [x.clone() for x in batch.xs], "y": batch.y.clone(), "clean": batch.clean.clone()}
        g.static["ids"] = batch.ids.clone()
        g.graph = _Graph([grp["lr"] for p in peers for grp in p.optimizer.param_groups])
        graphs.append(g.graph)
        g.captures += 1

    monkeypatch.setattr(g, "_capture", capture)
    monkeypatch.setattr(g, "_eager_side_stream", lambda batch: step(batch.xs, batch.y, batch.clean, batch.ids))
    return g, step, peers, graphs


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_the_graph_is_recaptured_when_a_learning_rate_changes_and_replayed_otherwise(monkeypatch):
    g, step, peers, graphs = _graphed(monkeypatch)
    g(_batch())  # warm-up: eager
    assert (step.eager_calls, g.captures, g.replays) == (1, 0, 0)
    g(_batch(value=1.0))
    g(_batch(value=2.0))
    assert (g.captures, g.replays) == (1, 2)
    assert torch.equal(g.static["xs"][0], torch.full((BATCH, 1, 8, 8), 2.0))  # the replay saw this batch
    for p in peers:  # epoch 1 ends: the step schedule's first milestone halves every learning rate
        p.scheduler.step()
    assert peers[0].optimizer.param_groups[0]["lr"] == 0.05
    g(_batch())
    assert (g.captures, g.replays) == (2, 3) and graphs[-1].lrs == [0.05, 0.05]
    g(_batch())
    assert g.captures == 2
    peers[1].scheduler.step()  # one peer's learning rate alone is enough
    g(_batch())
    assert g.captures == 3 and graphs[-1].lrs == [0.05, 0.025]
    g(_batch(n=BATCH - 1))  # the epoch's last, smaller batch runs eagerly and captures nothing
    assert (step.eager_calls, g.captures, g.replays) == (2, 3, 5)


def test_the_graph_is_recaptured_when_the_exchange_or_the_active_peer_changes(monkeypatch):
    g, step, _, _ = _graphed(monkeypatch)
    g(_batch())
    g(_batch())
    assert g.captures == 1
    step.exchanging = False  # zero knowledge this epoch: no exchange in the step
    g(_batch())
    assert g.captures == 2
    g(_batch())
    assert g.captures == 2
    step.active = 1
    g(_batch())
    assert g.captures == 3
    step.active = 1
    g(_batch())
    assert (g.captures, g.replays) == (3, 5)
