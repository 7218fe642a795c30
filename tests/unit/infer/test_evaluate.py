"""`cmd-dist evaluate`: the numbers are the chosen checkpoint's (last = summary.json's test accuracy, best =
best_checkpoint's metrics, per peer), the ensemble is the mean of the peers' softmax, the measures (top-5, loss, ECE,
per-class accuracy) are what their definitions say, the splits follow the run's protocol, and the command line prints
one table and writes the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from cmd_dist.cli import main
from cmd_dist.data.scoring import scoring_set
from cmd_dist.infer.evaluate import ENSEMBLE, evaluate_run, format_table, write_json
from cmd_dist.infer.loading import open_trained_run
from cmd_dist.infer.metrics import calibration_bins, expected_calibration_error


def _rows(result: dict) -> dict[str, dict]:
    return {r["name"]: r for r in result["models"]}


def test_last_is_summary_jsons_test_accuracy_for_every_peer(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    rows = _rows(evaluate_run(str(trained_run), "last"))
    for peer in summary["peers"]:
        assert rows[peer["name"]]["top1"] == pytest.approx(peer["test_acc"], abs=1e-6)


def test_best_is_best_checkpoints_metrics_and_an_epoch_is_its_checkpoint(trained_run):
    best = json.loads((trained_run / "best_checkpoint" / "metrics.json").read_text())
    result = evaluate_run(str(trained_run), "best")
    assert (result["checkpoint"], result["epoch"]) == ("best_checkpoint", 2)
    rows = _rows(result)
    for name in ("peerA", "peerB"):
        assert rows[name]["top1"] == pytest.approx(best[f"{name}/test_acc"], abs=1e-6)
    epoch2 = _rows(evaluate_run(str(trained_run), "2"))
    assert all(epoch2[n] == rows[n] for n in rows)  # the same files: every number the same
    last = evaluate_run(str(trained_run), "last")
    assert _rows(last)["peerA"]["top1"] != rows["peerA"]["top1"]  # epochs 2 and 3 differ in this run
    # best was chosen on the test split of this final-protocol run: the table says its numbers are optimistic
    assert result["selected_on"] == "test" and "note: best_checkpoint is the epoch chosen" in format_table(result)
    assert last["selected_on"] is None and "note:" not in format_table(last)


def test_the_ensemble_is_the_mean_of_the_peers_softmax(trained_run):
    result = evaluate_run(str(trained_run), "last")
    rows = _rows(result)
    trained = open_trained_run(str(trained_run), "last")
    data = scoring_set(trained.cfg.data, trained.cfg.noise, "test")
    (x, y), *_ = data.batches(10_000)
    with torch.no_grad():
        probs = [torch.softmax(m(x), 1) for m in trained.models().values()]
    preds = [p.argmax(1) for p in probs]
    assert (preds[0] != preds[1]).any()  # the peers disagree on some images
    mean = torch.stack(probs).mean(0)
    assert rows[ENSEMBLE]["top1"] == pytest.approx(100.0 * float((mean.argmax(1) == y).float().mean()), abs=1e-6)
    nll = -torch.log(mean.double().gather(1, y[:, None])).mean()
    assert rows[ENSEMBLE]["loss"] == pytest.approx(float(nll), rel=1e-6)
    peer_loss = torch.nn.functional.cross_entropy(torch.log(probs[0].double()), y)
    assert rows["peerA"]["loss"] == pytest.approx(float(peer_loss), rel=1e-6)
    for peer in ("peerA", "peerB"):  # where the peers disagree, the ensemble is neither of them
        assert (rows[ENSEMBLE]["top1"], rows[ENSEMBLE]["loss"]) != (rows[peer]["top1"], rows[peer]["loss"])
    top5 = (mean.topk(5, 1).indices == y[:, None]).any(1).float().mean()
    assert rows[ENSEMBLE]["top5"] == pytest.approx(100.0 * float(top5), abs=1e-6)


def test_per_class_accuracy_adds_up_to_top1(trained_run):
    result = evaluate_run(str(trained_run), "best")
    for row in result["models"]:
        per = row["per_class"]
        assert [c["class"] for c in per] == [str(i) for i in range(10)]
        assert sum(c["images"] for c in per) == result["images"] == 300
        hits = sum(c["images"] * c["top1"] / 100.0 for c in per if c["images"])
        assert 100.0 * hits / 300 == pytest.approx(row["top1"], abs=1e-9)


def test_ece_by_hand():
    """Guo et al. (2017) Eq. 3 with 15 equal-width bins ((m-1)/15, m/15]."""
    conf = torch.tensor([0.95, 0.95, 0.5, 0.5, 1.0 / 15, 1.0], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, False, True])
    count, conf_sum, hit_sum = calibration_bins(conf, correct)
    assert count[0] == 1 and count[14] == 3 and count[7] == 2 and count.sum() == 6  # 1/15 is bin 1's upper edge
    # bin 15: conf 0.95 + 0.95 + 1.0 = 2.9, hits 2 -> |2 - 2.9|; bin 8: |2 - 1.0|; bin 1: |0 - 1/15|
    want = (0.9 + 1.0 + 1.0 / 15) / 6
    assert float(expected_calibration_error(count, conf_sum, hit_sum)) == pytest.approx(want, abs=1e-12)


def test_splits_follow_the_protocol(trained_run, search_run):
    summary = json.loads((search_run / "summary.json").read_text())
    result = evaluate_run(str(search_run), "last")  # default: the split the run evaluated on
    assert (result["split"], result["images"], result["protocol"]) == ("val", 60, "search")
    for peer in summary["peers"]:
        assert _rows(result)[peer["name"]]["top1"] == pytest.approx(peer["val_acc"], abs=1e-6)
    assert evaluate_run(str(search_run), "last", split="train")["images"] == 540
    assert evaluate_run(str(search_run), "last", split="test")["images"] == 300
    assert evaluate_run(str(trained_run), "last", split="train")["images"] == 600


def test_a_run_behind_a_uri_gives_the_same_numbers(trained_run):
    assert evaluate_run(trained_run.as_uri(), "last")["models"] == evaluate_run(str(trained_run), "last")["models"]


def test_cli_prints_one_table_and_writes_the_json(trained_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(trained_run), "--checkpoint", "last", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "checkpoint_000003 (epoch 3) on the test split of digits (300 images" in printed[0]
    assert printed[1].split() == ["model", "top-1", "top-5", "loss", "ECE", "(15", "bins)"]
    assert [line.split()[0] for line in printed[2:5]] == ["peerA", "peerB", "ensemble"]
    saved = json.loads(out.read_text())
    assert saved["ece_bins"] == 15 and saved["checkpoint"] == "checkpoint_000003"
    summary = json.loads((trained_run / "summary.json").read_text())
    assert _rows(saved)["peerB"]["top1"] == pytest.approx(summary["peers"][1]["test_acc"], abs=1e-6)
    assert printed[3].split()[1] == f"{summary['peers'][1]['test_acc']:.2f}%"


def test_out_is_written_atomically(tmp_path, monkeypatch):
    """A failed write leaves the old file whole and no temporary file beside it."""
    out = tmp_path / "eval.json"
    out.write_text("old")
    write_json({"models": []}, out)
    assert json.loads(out.read_text()) == {"models": []}

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        write_json({"models": [1]}, out)
    assert json.loads(out.read_text()) == {"models": []} and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_overrides_may_move_the_data_not_change_what_was_trained(trained_run, tmp_path, capsys):
    result = evaluate_run(str(trained_run), "last", overrides=["data.root=/elsewhere", "train.eval_batch_size=7"])
    assert result["models"] == evaluate_run(str(trained_run), "last")["models"]  # digits ignore data.root
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(trained_run), "data.protocol=search"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmd-dist: error: data.protocol: evaluate scores the peers as they")


def test_scoring_keeps_no_autograd_graph(trained_run, monkeypatch):
    from cmd_dist.infer import metrics

    seen, update = [], metrics.Scores.update

    def spy(self, log_probs, y):
        seen.append((torch.is_grad_enabled(), log_probs.requires_grad))
        update(self, log_probs, y)

    monkeypatch.setattr(metrics.Scores, "update", spy)
    evaluate_run(str(trained_run), "last")
    assert seen and set(seen) == {(False, False)}
