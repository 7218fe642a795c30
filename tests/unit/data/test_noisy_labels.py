"""Human noisy labels (CIFAR-N): the shipped files, checks against the clean labels, realised noise rate.

CIFAR-100N runs on the real CIFAR-100 images in ../shared/data; the CIFAR-10 images are not shipped,
so CIFAR-10N is tested on a CIFAR-10 pickle fixture carrying the first images' real CIFAR-N labels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cmd_dist.config import ConfigError, load_config
from cmd_dist.data.human_labels import LabelFileError, human_labels, load_label_file
from cmd_dist.data.noise import noise_rate
from cmd_dist.data.prepare import check_data, prepare_data
from cmd_dist.errors import DataError
from tests.conftest import SHARED_CIFAR
from tests.image_fixtures import make_cifar10

CIFAR_N = Path(SHARED_CIFAR) / "cifar-n"
needs_cifar_n = pytest.mark.skipif(not (CIFAR_N / "CIFAR-10_human.pt").is_file(), reason="CIFAR-N files not found")
needs_cifar100 = pytest.mark.skipif(
    not os.path.isdir(os.path.join(SHARED_CIFAR, "cifar-100-python")), reason="shared CIFAR-100 not found"
)


def test_noise_rate_counts_only_known_clean_labels():
    noisy = torch.tensor([0, 1, 2, 3])
    assert noise_rate(noisy, torch.tensor([0, 0, 2, 2])) == 0.5
    assert noise_rate(noisy, torch.tensor([-1, 0, -1, 3])) == 0.5
    assert math.isnan(noise_rate(noisy, torch.full((4,), -1)))


@needs_cifar_n
def test_shipped_cifar10n_label_sets_have_their_published_noise_levels():
    labels = load_label_file(CIFAR_N / "CIFAR-10_human.pt")
    rates = {k: noise_rate(labels[k], labels["clean_label"]) for k in labels if k != "clean_label"}
    # Wei et al. 2022 (Table 1) give aggregate 9.03%, random 17.23/18.12/17.64%, worst 40.21%; the shipped file:
    assert rates["worse_label"] == pytest.approx(0.4021, abs=1e-4)
    assert rates["random_label1"] == pytest.approx(0.1723, abs=1e-4)
    assert rates["random_label2"] == pytest.approx(0.1812, abs=1e-4)
    assert rates["random_label3"] == pytest.approx(0.1764, abs=1e-4)
    assert rates["aggre_label"] == pytest.approx(0.0901, abs=1e-4)


def _cifar10n_fixture(tmp_path: Path, n: int = 200) -> tuple[Path, dict]:
    """CIFAR-10 pickles with the first n images' real clean labels, and a CIFAR-N file cut to those n images."""
    real = load_label_file(CIFAR_N / "CIFAR-10_human.pt")
    cut = {k: v[:n].numpy() for k, v in real.items()}  # numpy arrays, like the shipped file
    root = make_cifar10(tmp_path / "data", cut["clean_label"])
    (root / "cifar-n").mkdir()
    torch.save(cut, root / "cifar-n" / "CIFAR-10_human.pt")
    return root, cut


@needs_cifar_n
@pytest.mark.parametrize(
    "label_set,key",
    [
        ("worst", "worse_label"),
        ("aggre", "aggre_label"),
        ("random1", "random_label1"),
        ("random2", "random_label2"),
        ("random3", "random_label3"),
    ],
)
def test_cifar10n_labels_replace_the_training_labels(tmp_path, label_set, key):
    root, cut = _cifar10n_fixture(tmp_path)
    cfg = load_config(
        None, ["data.dataset=cifar10", f"data.root={root}", "noise.kind=human", f"noise.label_set={label_set}"]
    )
    data = prepare_data(cfg.data, cfg.noise)
    assert torch.equal(data.train_labels, torch.from_numpy(cut[key]))
    assert torch.equal(data.train_clean, torch.from_numpy(cut["clean_label"]))
    expected = float((cut[key] != cut["clean_label"]).mean())
    assert data.noise_rate == pytest.approx(expected) and check_data(cfg.data, cfg.noise).noise_rate == pytest.approx(
        expected
    )
    # search protocol: the 10% validation keeps clean labels, the rate is over the 90% trained on
    s = load_config(None, [*_args(root, label_set), "data.protocol=search"])
    sd = prepare_data(s.data, s.noise)
    assert sd.noise_rate == pytest.approx(noise_rate(sd.train_labels, sd.train_clean))
    assert check_data(s.data, s.noise).noise_rate == pytest.approx(sd.noise_rate)


#: Every CIFAR-N label set and the array it must be read from (Wei et al.'s published file keys), written out
#: here rather than taken from cmd_dist.data.human_labels so that a set read under another set's key shows.
CIFAR10N_SETS = {
    "aggre": "aggre_label",
    "worst": "worse_label",
    "random1": "random_label1",
    "random2": "random_label2",
    "random3": "random_label3",
}


def _distinct_cifar10n(tmp_path: Path, n: int = 40) -> tuple[Path, dict]:
    """CIFAR-10 pickles and a CIFAR-N file whose five label sets differ from each other at every image."""
    clean = np.arange(n) % 10
    arrays = {"clean_label": clean}
    for i, key in enumerate(CIFAR10N_SETS.values()):
        arrays[key] = (clean + i + 1) % 10
    root = make_cifar10(tmp_path / "data", clean)
    (root / "cifar-n").mkdir()
    torch.save(arrays, root / "cifar-n" / "CIFAR-10_human.pt")
    return root, arrays


@pytest.mark.parametrize("label_set", sorted(CIFAR10N_SETS))
def test_every_cifar10n_label_set_is_read_from_its_own_array(tmp_path, label_set):
    root, arrays = _distinct_cifar10n(tmp_path)
    cfg = load_config(None, _args(root, label_set))
    data = prepare_data(cfg.data, cfg.noise)
    assert torch.equal(data.train_labels, torch.from_numpy(arrays[CIFAR10N_SETS[label_set]]))
    assert torch.equal(data.train_clean, torch.from_numpy(arrays["clean_label"]))


@pytest.mark.parametrize(
    "label_set,key,clean_key,classes",
    [
        ("noisy_fine", "noisy_label", "clean_label", 100),
        ("noisy_coarse", "noisy_coarse_label", "clean_coarse_label", 20),
    ],
)
def test_both_cifar100n_label_sets_are_read_from_their_own_arrays(tmp_path, label_set, key, clean_key, classes):
    n = 60
    fine = np.arange(n) % 100
    coarse = (np.arange(n) * 7) % 20  # differs from the fine labels, so the wrong clean array is refused
    arrays = {
        "clean_label": fine,
        "noisy_label": (fine + 1) % 100,
        "clean_coarse_label": coarse,
        "noisy_coarse_label": (coarse + 3) % 20,
    }
    path = tmp_path / "CIFAR-100_human.pt"
    torch.save(arrays, path)
    clean = torch.from_numpy(arrays[clean_key])
    got = human_labels("cifar100", label_set, path, clean, classes)
    assert torch.equal(got, torch.from_numpy(arrays[key]))
    other = "clean_coarse_label" if clean_key == "clean_label" else "clean_label"
    with pytest.raises(LabelFileError, match="disagrees with the cifar100 training labels"):
        human_labels("cifar100", label_set, path, torch.from_numpy(arrays[other]), classes)


def _args(root, label_set="worst"):
    return ["data.dataset=cifar10", f"data.root={root}", "noise.kind=human", f"noise.label_set={label_set}"]


@needs_cifar_n
def test_cifar10n_file_for_other_images_is_refused(tmp_path):
    root, cut = _cifar10n_fixture(tmp_path)
    shuffled = dict(cut, clean_label=np.roll(cut["clean_label"], 1))
    bad = tmp_path / "shuffled.pt"
    torch.save(shuffled, bad)
    cfg = load_config(None, [*_args(root), f"noise.label_file={bad}"])
    with pytest.raises(DataError, match=r"disagrees with the cifar10 training labels at \d+ of 200"):
        check_data(cfg.data, cfg.noise)
    full = load_config(None, [*_args(root), f"noise.label_file={CIFAR_N / 'CIFAR-10_human.pt'}"])
    with pytest.raises(DataError, match="50000 labels for 200 training images"):
        prepare_data(full.data, full.noise)
    c100 = load_config(None, [*_args(root), f"noise.label_file={CIFAR_N / 'CIFAR-100_human.pt'}"])
    with pytest.raises(DataError, match="no 'worse_label' array"):
        check_data(c100.data, c100.noise)


def test_missing_or_hostile_label_file_is_a_one_line_error(tmp_path):
    root = make_cifar10(tmp_path / "data", np.arange(50) % 10)
    cfg = load_config(None, _args(root))
    with pytest.raises(DataError) as info:
        check_data(cfg.data, cfg.noise)
    msg = str(info.value)
    assert "CIFAR-10_human.pt not found" in msg and "noise.label_file" in msg and "\n" not in msg

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"clean_label": Payload()}, evil)
    with pytest.raises(LabelFileError, match="could not be read safely"):
        load_label_file(evil)
    cfg = load_config(None, [*_args(root), f"noise.label_file={evil}"])
    with pytest.raises(DataError, match="could not be read safely"):
        check_data(cfg.data, cfg.noise)
    cfg = load_config(None, [*_args(root), f"noise.label_file={tmp_path / 'nope.pt'}"])
    with pytest.raises(DataError, match="nope.pt not found"):
        check_data(cfg.data, cfg.noise)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["data.dataset=digits", "noise.kind=human", "noise.label_set=worst"], "noise.kind"),
        (["data.dataset=cifar10", "noise.kind=human"], "noise.label_set: required"),
        (["data.dataset=cifar10", "noise.kind=human", "noise.label_set=noisy_fine"], "noise.label_set"),
        (["data.dataset=cifar100", "noise.kind=human", "noise.label_set=worst"], "noisy_coarse"),
        (["data.dataset=cifar10", "noise.label_set=worst"], "only used with noise.kind=human"),
        (["noise.label_file=x.pt"], "noise.label_file"),
        (["noise.kind=gaussian"], "noise.kind"),
    ],
)
def test_human_noise_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


@needs_cifar_n
@needs_cifar100
def test_cifar100n_fine_and_coarse_on_the_real_images():
    fine = load_config(
        None, ["data.dataset=cifar100", f"data.root={SHARED_CIFAR}", "noise.kind=human", "noise.label_set=noisy_fine"]
    )
    check = check_data(fine.data, fine.noise)
    assert check.num_train == 50_000 and check.noise_rate == pytest.approx(0.402, abs=1e-6)
    assert "CIFAR-100N noisy_fine" in check.line() and "40.20%" in check.line()
    coarse = load_config(
        None,
        [
            "data.dataset=cifar100",
            f"data.root={SHARED_CIFAR}",
            "noise.kind=human",
            "noise.label_set=noisy_coarse",
            "data.test_subset=100",
        ],
    )
    d = prepare_data(coarse.data, coarse.noise)
    assert d.spec.num_classes == 20 and int(d.train_clean.max()) == 19 and int(d.eval_y.max()) <= 19
    assert d.noise_rate == pytest.approx(0.26404, abs=1e-6)


@needs_cifar_n
@needs_cifar100
def test_cifar100n_trains_end_to_end_and_reports_its_noise_rate(tmp_path, capsys):
    from cmd_dist.launch.preflight import preflight
    from cmd_dist.launch.summary import summarize
    from cmd_dist.train.local import run_local

    cfg = load_config(
        None,
        [
            "data.dataset=cifar100",
            f"data.root={SHARED_CIFAR}",
            "noise.kind=human",
            "noise.label_set=noisy_fine",
            "data.train_subset=256",
            "data.test_subset=128",
            "train.epochs=1",
            "train.batch_size=64",
            "train.log_every=0",
        ],
    )
    preflight(cfg)
    assert "realised noise rate" in capsys.readouterr().out
    metrics, _ = run_local(cfg, tmp_path / "run")
    labels = load_label_file(CIFAR_N / "CIFAR-100_human.pt")
    expected = noise_rate(labels["noisy_label"][:256], labels["clean_label"][:256])
    assert metrics["noise_rate"] == pytest.approx(expected) and 0.2 < expected < 0.6
    summary = summarize(cfg, metrics, tmp_path / "run", 1.0)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["noise_rate"] == pytest.approx(expected)
    assert summary["skipped_images"] == 0
