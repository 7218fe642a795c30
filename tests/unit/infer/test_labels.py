"""``cmd-dist label-issues RUN`` (issue 21 points 2 and 5): the flipped labels of a tiny real run ranked first,
the identity of each sample in the dataset as shipped, the files it writes, and a run without a record refused."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from cmd_dist.cli import main
from cmd_dist.config import load_config
from cmd_dist.data.noise import corrupt_labels
from cmd_dist.infer.labels import flag_warning, score_samples
from cmd_dist.runs.checkpoint import load_peer_state, save_peer_state
from tests.conftest import SHARED_CIFAR


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_flipped_labels_of_a_tiny_run_rank_above_the_rest(trained_run, tmp_path, capsys):
    out = tmp_path / "issues.csv"
    assert main(["label-issues", str(trained_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "flagged" in printed and "score AUROC" in printed
    rows = _rows(out)
    assert len(rows) == 600 and [int(r["rank"]) for r in rows] == list(range(1, 601))
    # The truth, rebuilt independently: digits' training part (1,438 = 80% of load_digits(), split seeded 0)
    # corrupted by the run's noise, its first 600 images trained on; each named by its index in load_digits().
    cfg = load_config(trained_run / "config.yaml")
    clean = torch.as_tensor(load_digits().target)
    train_idx = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[359:].sort().values
    noisy, flipped = corrupt_labels(clean[train_idx], 10, cfg.noise.kind, cfg.noise.rate, cfg.noise.seed)
    truth = {int(i): (int(y), bool(f)) for i, y, f in zip(train_idx[:600], noisy[:600], flipped[:600])}
    index = [int(r["sample"]) for r in rows]
    assert set(index) == set(truth)
    # every row's identity: its given and clean labels are those of that load_digits() image
    assert [int(r["clean_label"]) for r in rows] == clean[index].tolist()
    assert [int(r["given_label"]) for r in rows] == [truth[i][0] for i in index]
    is_flipped = np.array([truth[i][1] for i in index])
    assert 0.25 < is_flipped.mean() < 0.55
    # Ranked first: the flipped labels fill the top of the ranking far beyond their share.
    n_noisy = int(is_flipped.sum())
    assert is_flipped[:n_noisy].mean() > 0.8, is_flipped[:n_noisy].mean()
    summary = json.loads((tmp_path / "label_issues.json").read_text())
    assert summary["metrics"]["score_auroc"] > 0.9
    assert summary["metrics"]["noisy"] == n_noisy
    assert "warning" in summary
    assert summary["warning"] == flag_warning(summary["flagged"], summary["agreed_label_differs"], 600)
    assert sum(summary["score_histogram"]["noisy"]) == n_noisy
    det = np.load(tmp_path / "detection.npy")
    assert det.dtype == bool and det.shape == (1797,)
    flagged = {int(r["sample"]) for r in rows if r["flag"] == "1"}
    assert set(np.nonzero(det)[0].tolist()) == flagged and len(flagged) == summary["flagged"]


def test_top_k_the_default_output_folder_and_the_report(trained_run, run_copy, capsys):
    assert main(["label-issues", str(run_copy), "--top", "5", "--checkpoint", "best"]) == 0
    folder = run_copy / "label_issues"
    assert len(_rows(folder / "issues.csv")) == 5
    summary = json.loads((folder / "label_issues.json").read_text())
    assert summary["checkpoint"] == "best_checkpoint" and summary["epoch"] == 2
    assert np.load(folder / "detection.npy").shape == (1797,)
    # cmd-dist report shows the detection figures (label_issues.json's numbers) and the score histogram.
    assert main(["report", str(run_copy)]) == 0
    text = (run_copy / "report" / "report.md").read_text()
    m = summary["metrics"]
    assert f"{summary['flagged']:,} of 600 training labels flagged" in text
    flag_row = (
        f"| flag | {m['flag_precision']:.3f} | {m['flag_recall']:.3f} | {m['flag_f1']:.3f} | {m['flag_auroc']:.3f} |"
    )
    assert flag_row in text
    assert f"{m['score_auroc']:.3f}" in text
    (png,) = re.findall(r"\]\(([^)]*_label_scores\.png)\)", text)
    assert (run_copy / "report" / png).read_bytes()[:4] == b"\x89PNG"
    # The tiny run's best checkpoint (epoch 2) has learned little: more than half its labels are flagged, and the
    # note says so in label_issues.json and in the report; without a warning the report has no note.
    assert summary["flagged"] > 300 and summary["warning"] == flag_warning(
        summary["flagged"], summary["agreed_label_differs"], 600
    )
    assert f"Note: {summary['warning']}." in text
    summary["warning"] = None
    (folder / "label_issues.json").write_text(json.dumps(summary))
    assert main(["report", str(run_copy)]) == 0
    assert "Note:" not in (run_copy / "report" / "report.md").read_text()


def test_a_run_trained_before_the_record_gets_one_line_and_exit_2(run_copy, capsys):
    folder = run_copy / "checkpoint_000003"
    for k in (0, 1):
        state = load_peer_state(folder, k)
        del state["dynamics"]
        save_peer_state(folder, k, state)
    with pytest.raises(SystemExit) as e:
        main(["label-issues", str(run_copy)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no per-sample record" in err[0] and err[0].startswith("cmd-dist: error:")
    assert not (run_copy / "label_issues").exists()


def _plain_weights(rec: dict) -> dict:
    """A hand-made record with every epoch weighted 1: the late-weighted sums are the plain ones."""
    return {**rec, "weighted_margin_sum": rec["margin_sum"], "weight_sum": rec["seen"]}


def test_score_ranks_low_aum_first():
    """Hand-made records, every epoch weighted 1: sample 0 contradicted with a negative AUM, sample 2 agreed with."""
    seen = np.full(3, 4.0)
    rec = {
        "margin_sum": np.array([-8.0, 0.4, 12.0]),
        "seen": seen,
        "disagree": np.array([4.0, 1.0, 0.0]),
        "last_pred": np.array([1, 1, 2]),
        "last_prob": np.array([0.9, 0.5, 0.95]),
    }
    rec = _plain_weights(rec)
    s = score_samples([rec, rec], np.array([0, 1, 2]), 3)
    assert s.order.tolist() == [0, 1, 2]
    assert s.agreed_label.tolist() == [1, 1, 2] and s.agreed_prob.tolist() == pytest.approx([0.9, 0.5, 0.95])
    # One sample per class: Confident Learning keeps at least one correct label per class in its joint, so the one
    # sample given 0 counts as half wrong, rounded to none (sample 0's agreed label still differs).
    assert s.n_disagree == 1 and s.n_est == 0 and not s.flag.any()


def test_the_score_follows_the_late_weighted_aum_not_the_plain_mean():
    """Sample 0 was contradicted early and fitted late (a clean label learned slowly); sample 1 was fitted early and
    contradicted late (the network unlearned a wrong label). Plain AUM ranks 0 first; the late-weighted AUM, 1."""
    rec = {
        "margin_sum": np.array([-6.0 + 2.0, 3.0 - 2.0, 8.0]),  # two epochs: (-6, 2), (3, -2), (4, 4)
        "seen": np.full(3, 2.0),
        "weighted_margin_sum": np.array([-6.0 + 4 * 2.0, 3.0 + 4 * -2.0, 4.0 + 4 * 4.0]),  # weights 1 and 4
        "weight_sum": np.full(3, 5.0),
        "disagree": np.array([1.0, 1.0, 0.0]),
        "last_pred": np.array([0, 0, 2]),
        "last_prob": np.array([0.6, 0.6, 0.9]),
    }
    s = score_samples([rec], np.array([0, 1, 2]), 3)
    assert (s.aum[0, 0] < s.aum[0, 1]) and (s.late_aum[0].tolist() == pytest.approx([0.4, -1.0, 4.0]))
    assert s.order.tolist() == [1, 0, 2]


def test_a_sample_never_trained_on_is_neither_scored_nor_flagged():
    """An unreadable image (streamed data) is never seen: score 0, no flag, no agreed label."""
    rec = {
        "margin_sum": np.array([-8.0, 0.0, 8.0, 8.0]),
        "seen": np.array([4.0, 0.0, 4.0, 4.0]),
        "disagree": np.array([4.0, 0.0, 0.0, 0.0]),
        "last_pred": np.array([1, -1, 1, 0]),
        "last_prob": np.array([0.9, 0.0, 0.8, 0.9]),
    }
    rec = _plain_weights(rec)
    s = score_samples([rec], np.array([0, 0, 1, 0]), 2)
    assert s.score[1] == 0.0 and not s.flag[1] and s.agreed_label[1] == -1 and s.seen[1] == 0
    assert s.flag.tolist() == [True, False, False, False] and s.n_est == 1


def _records(given, pred, prob, margin):
    """Two identical peers (their mean probability is each one's), every sample seen in 4 epochs."""
    n = len(given)
    rec = {
        "margin_sum": np.array(margin, dtype=float),
        "seen": np.full(n, 4.0),
        "disagree": np.where(np.array(pred) != np.array(given), 4.0, 0.0),
        "last_pred": np.array(pred),
        "last_prob": np.array(prob),
    }
    rec = _plain_weights(rec)
    return [rec, rec], np.array(given)


def test_the_flag_counts_only_confident_disagreements_scaled_to_each_class():
    """The flag's size is Confident Learning's estimate (Northcutt et al., JAIR 2021), not the count of samples whose
    agreed label differs from the given one: a disagreement below the predicted class's threshold (the mean
    probability of that class over the samples given it) is an underfit network's mistake, not a wrong label."""
    # Given 0: three predicted 0 at 0.9 and one predicted 1 at 0.95 (t_0 = 2.7 / 4 = 0.675). Given 1: three
    # predicted 1 at 0.9 and one predicted 0 at 0.3, below t_0 (t_1 = 2.7 / 4 = 0.675).
    records, given = _records(
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0.9, 0.9, 0.9, 0.95, 0.9, 0.9, 0.9, 0.3],
        [8.0, 8.0, 8.0, -8.0, 8.0, 8.0, 8.0, -4.0],
    )
    s = score_samples(records, given, 3)
    assert s.n_disagree == 2 and s.n_est == 1
    assert s.order[:2].tolist() == [3, 7] and s.flag.tolist() == [False] * 3 + [True] + [False] * 4
    # Each given class's confident counts are scaled to its size: of the 4 samples given 0, two are confident
    # (A of class 0, B of class 1 at 0.9 >= t_1 = 0.8) and two are not (0.1 < t_0 = 1.1 / 4): 1/2 x 4 = 2 wrong.
    records, given = _records(
        [0, 0, 0, 0, 1, 1], [0, 1, 0, 0, 1, 1], [0.9, 0.9, 0.1, 0.1, 0.8, 0.8], [8, -8, 1, 1, 8, 8]
    )
    s = score_samples(records, given, 2)
    assert s.n_disagree == 1 and s.n_est == 2 and s.flag.sum() == 2 and s.flag[1]


def test_an_image_folder_run_names_each_sample_by_its_file(tmp_path, capsys):
    """Streamed data: the batch ids are positions in the training file list, and the CSV names each file."""
    from tests.image_fixtures import train_imagefolder_run

    run_dir, root = train_imagefolder_run(tmp_path, ["noise.rate=0.4"])
    assert main(["label-issues", str(run_dir)]) == 0
    rows = _rows(run_dir / "label_issues" / "issues.csv")
    files = sorted(str(p) for p in (root / "train").rglob("*.*"))
    assert sorted(r["sample"] for r in rows) == files and len(files) == 21  # every training file once
    classes = ["cat", "dog", "fox"]
    for r in rows:  # the clean label is the file's class folder; every file was trained on in both epochs
        assert classes[int(r["clean_label"])] == Path(r["sample"]).parent.name and r["epochs_seen"] == "4"
    assert any(r["given_label"] != r["clean_label"] for r in rows)
    det = np.load(run_dir / "label_issues" / "detection.npy")
    assert det.shape == (21,)  # the shipped list's order: class folders, then file names, sorted (= sorted paths here)
    assert {files[i] for i in np.nonzero(det)[0]} == {r["sample"] for r in rows if r["flag"] == "1"}


def test_a_streamed_search_run_on_a_subset_has_one_detection_entry_per_shipped_image(tmp_path, monkeypatch):
    """detection.npy has one entry per image of the shipped train/ list, in its order, whatever the run trained on:
    ``data.train_subset=18`` of the 21 images, of which the search protocol (no val/ folder) holds out 2. Those 5
    images are False, and the True entries are exactly the CSV's flagged paths."""
    from cmd_dist.infer import labels
    from tests.image_fixtures import train_imagefolder_run

    overrides = ["noise.rate=0.4", "data.protocol=search", "data.train_subset=18"]
    run_dir, root = train_imagefolder_run(tmp_path, overrides, splits=("train",))
    shipped = sorted(str(p) for p in (root / "train").rglob("*.*"))  # class folders, then file names
    real = labels.score_samples

    def every_third(*args, **kwargs):  # a known flag, not whatever the scoring flags after 2 epochs on 16 images
        s = real(*args, **kwargs)
        s.flag = np.arange(s.flag.shape[0]) % 3 == 0
        return s

    monkeypatch.setattr(labels, "score_samples", every_third)
    assert main(["label-issues", str(run_dir)]) == 0
    rows = _rows(run_dir / "label_issues" / "issues.csv")
    trained = {r["sample"] for r in rows}
    assert len(shipped) == 21 and len(rows) == len(trained) == 16 and trained < set(shipped)
    det = np.load(run_dir / "label_issues" / "detection.npy")
    assert det.dtype == bool and det.shape == (21,)
    flagged = sorted(shipped.index(r["sample"]) for r in rows if r["flag"] == "1")
    assert len(flagged) == 6 and np.nonzero(det)[0].tolist() == flagged
    untrained = [i for i, p in enumerate(shipped) if p not in trained]  # past the subset, or held out
    assert len(untrained) == 5 and not det[untrained].any()
    # Every training position, flagged or not, names the shipped image at its origin.
    samples = labels.training_samples(load_config(run_dir / "config.yaml"))
    assert samples.shipped == 21 and [shipped[i] for i in samples.origin] == samples.keys


def test_food101n_and_webvision_training_images_keep_their_line_in_the_list(tmp_path):
    """Food-101N's search protocol drops the verified-val images from training and ``data.train_subset`` cuts the
    rest; WebVision keeps the list's lines of the first ``data.num_classes`` classes. Each training image's origin is
    its line in the list as read (no image decoded), so detection.npy's entries follow the list file."""
    from cmd_dist.infer.labels import training_samples
    from tests.image_fixtures import make_food101n, make_webvision

    def cfg(dataset, root, *more):
        settings = [f"data.dataset={dataset}", f"data.root={root}", "noise.kind=none", "data.workers=0"]
        return load_config(None, [*settings, "data.protocol=search", "data.train_subset=10", *more])

    food = make_food101n(tmp_path / "food")  # 3 classes x 6 images, one per class in verified_val.tsv
    meta = food / "Food-101N_release" / "meta"
    lines = meta.joinpath("imagelist.tsv").read_text().splitlines()[1:]
    held = {ln.split("\t")[0] for ln in meta.joinpath("verified_val.tsv").read_text().splitlines()[1:]}
    s = training_samples(cfg("food101n", food))
    assert s.shipped == 18 and len(s.keys) == 10 and len(set(s.origin.tolist())) == 10 and len(held) == 3
    assert s.keys == [str(food / "Food-101N_release" / "images" / lines[i]) for i in s.origin]
    assert not {lines[i] for i in s.origin} & held

    wv = make_webvision(tmp_path / "wv", classes=4, per_class=6, imagenet=False)
    listed = [ln.split() for ln in (wv / "webvision" / "info" / "train_filelist_google.txt").read_text().splitlines()]
    kept = [path for path, label in listed if int(label) < 3]
    s = training_samples(cfg("webvision", wv, "data.num_classes=3"))
    assert s.shipped == len(kept) == 18 and len(s.keys) == 10
    assert s.keys == [str(wv / "webvision" / kept[i]) for i in s.origin]


@pytest.mark.skipif(not (Path(SHARED_CIFAR) / "cifar-100-python").is_dir(), reason="shared CIFAR-100 not present")
def test_cifar_training_positions_map_back_to_the_train_pickle():
    """The search protocol holds out 10% of a subset: each training image is the pickle's image at its origin."""
    from cmd_dist.data.prepare import prepare_data
    from cmd_dist.data.resident import load_cifar

    cfg = load_config(
        None,
        [
            "data.dataset=cifar100",
            f"data.root={SHARED_CIFAR}",
            "data.protocol=search",
            "data.train_subset=3000",
            "noise.rate=0.4",
            "noise.seed=3",
        ],
    )
    data = prepare_data(cfg.data, cfg.noise)
    x, y = load_cifar("cifar100", SHARED_CIFAR, "train")
    assert data.shipped_train == 50000 and data.num_train == 2700
    assert torch.equal(x[data.train_origin], data.train_x) and torch.equal(y[data.train_origin], data.train_clean)
    assert len(set(data.train_origin.tolist())) == 2700 and int(data.train_origin.max()) < 3000


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--top", "0"], "--top 0: give a number of rows of at least 1"),
        (["--checkpoint", "99"], "--checkpoint 99:"),
        (["--checkpoint", "worst"], "is not best, last or an epoch number"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(run_copy, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["label-issues", str(run_copy), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (run_copy / "label_issues").exists()


def test_a_flag_of_more_than_half_the_labels_comes_with_a_note():
    """Peers that learned little get most labels flagged by the confident joint (the CIFAR-100 slice in
    docs/label_issues.md): the command says so, in its output and in label_issues.json; below half it says nothing."""
    note = flag_warning(701, 850, 1000)
    assert note is not None and "70% of the labels are estimated wrong" in note and "on 15% of" in note
    assert flag_warning(500, 900, 1000) is None and flag_warning(0, 0, 0) is None


def test_a_record_saved_before_the_late_weighted_sums_is_scored_by_its_plain_aum(run_copy, capsys):
    """Checkpoints of the first record's shape (no weighted sums): label-issues reads them as SampleDynamics restores
    them, every epoch weighted 1, so each peer's late-weighted AUM is its plain AUM."""
    folder = run_copy / "checkpoint_000003"
    for k in (0, 1):
        state = load_peer_state(folder, k)
        for key in ("weighted_margin_sum", "weight_sum"):
            del state["dynamics"][key]
        save_peer_state(folder, k, state)
    assert main(["label-issues", str(run_copy), "--out", str(run_copy / "old" / "issues.csv")]) == 0
    rows = _rows(run_copy / "old" / "issues.csv")
    for peer in ("peerA", "peerB"):
        assert [r[f"late_aum_{peer}"] for r in rows] == [r[f"aum_{peer}"] for r in rows]
