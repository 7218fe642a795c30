"""`cmd-dist predict` without Ray: which files an INPUT names, how they are read and viewed, the CSV's columns and
order, unreadable files skipped and listed, the ensemble as the mean of the peers' softmax, and the whole command on
a real (tiny, digits) run against the peers loaded directly."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmd_dist.data.types import SPECS, DatasetSpec
from cmd_dist.data.views import eval_view
from cmd_dist.errors import ConfigError, DataError
from cmd_dist.infer.images import UnreadableImage, eval_transform, list_images, normalize, read_image
from cmd_dist.infer.predict import PeerProbabilities, PredictionCsv, csv_header, predict_local, top_k
from cmd_dist.models import build_model
from tests.image_fixtures import corrupt_jpeg, write_jpeg

DIGITS = SPECS["digits"]


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **kw)
    return path


def _bad_files(folder: Path) -> list[Path]:
    """A truncated JPEG and a text file named .png."""
    corrupt_jpeg(folder / "truncated.jpg")
    (folder / "notes.png").write_text("not an image\n")
    return [folder / "truncated.jpg", folder / "notes.png"]


# -- listing ------------------------------------------------------------------------------------------------------


def test_folders_are_walked_recursively_in_sorted_order_and_named_files_taken_as_named(tmp_path):
    for rel in ["b/2.png", "b/1.JPG", "a.webp", "a/z/3.jpeg", ".hidden/4.png", "a/.5.png", "c.txt", "d/e.bmp"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    odd = tmp_path / "c.txt"
    files = list_images([str(tmp_path), str(odd), str(tmp_path / "b" / "2.png")])
    rel = [str(Path(f).relative_to(tmp_path)) for f in files]
    # hidden files and folders are skipped, c.txt only because it is named, b/2.png once
    assert rel == ["a.webp", "a/z/3.jpeg", "b/1.JPG", "b/2.png", "d/e.bmp", "c.txt"]


def test_an_input_with_no_images_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"INPUT .*empty: no image files there \(looked for jpg, jpeg, png"):
        list_images([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="INPUT .*nothing: no such file or folder"):
        list_images([str(tmp_path / "nothing")])


def test_cli_with_no_images_prints_one_line_and_exits_2(tmp_path, capsys):
    from cmd_dist.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["predict", str(tmp_path / "not-even-a-run"), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("cmd-dist: error: INPUT ") and "no image files there" in err[0]
    assert not (tmp_path / "p.csv").exists()


# -- reading ------------------------------------------------------------------------------------------------------


def test_every_format_reads_to_the_same_pixels_and_a_gif_to_its_first_frame(tmp_path):
    arr = _rgb(20, 30)
    lossless = {f: _save(tmp_path / f"x.{f}", arr) for f in ["png", "bmp", "tiff"]}
    _save(tmp_path / "x.webp", arr, lossless=True)
    lossless["webp"] = tmp_path / "x.webp"
    for fmt, path in lossless.items():  # bmp and tiff: through PIL (torchvision.io does not read them)
        assert torch.equal(read_image(path.read_bytes()), torch.from_numpy(arr).permute(2, 0, 1)), fmt
    gif = tmp_path / "x.gif"
    Image.fromarray(arr).save(gif, save_all=True, append_images=[Image.fromarray(255 - arr)])
    first = read_image(gif.read_bytes())
    assert first.shape == (3, 20, 30)
    assert torch.equal(first, read_image(_save(tmp_path / "one.gif", arr).read_bytes()))
    jpg = read_image(_save(tmp_path / "x.jpg", arr, quality=95).read_bytes())
    assert jpg.shape == (3, 20, 30) and jpg.dtype == torch.uint8


def test_unreadable_files_raise_with_a_reason(tmp_path):
    truncated, text = _bad_files(tmp_path)
    with pytest.raises(UnreadableImage, match="incomplete or truncated"):
        read_image(truncated.read_bytes())
    with pytest.raises(UnreadableImage, match="not an image file torchvision or PIL reads"):
        read_image(text.read_bytes())
    with pytest.raises(UnreadableImage, match="empty file"):
        read_image(b"")


# -- the evaluation view ------------------------------------------------------------------------------------------


def test_a_streamed_run_sees_its_training_evaluation_view():
    spec = DatasetSpec(5, 3, 16, 0, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    img = torch.from_numpy(_rgb(40, 60)).permute(2, 0, 1)
    assert torch.equal(eval_transform(img, spec, streamed=True), eval_view(img, 16))


def test_a_resident_run_sees_whole_images_of_its_size_and_its_channels():
    cifar = SPECS["cifar100"]
    img = torch.from_numpy(_rgb(32, 32)).permute(2, 0, 1)
    assert torch.equal(eval_transform(img, cifar, streamed=False), img)  # a CIFAR image passes unchanged
    wide = torch.from_numpy(_rgb(48, 64)).permute(2, 0, 1)
    out = eval_transform(wide, cifar, streamed=False)
    from torchvision.transforms.v2 import functional as TF

    assert torch.equal(out, TF.center_crop(TF.resize(wide, [32], antialias=True), [32, 32]))
    gray = torch.arange(64, dtype=torch.uint8).view(1, 8, 8).expand(3, 8, 8)
    assert torch.equal(eval_transform(gray, DIGITS, streamed=False), gray[:1])  # exact values, one channel
    colour = torch.from_numpy(_rgb(8, 8)).permute(2, 0, 1)
    assert torch.equal(eval_transform(colour, DIGITS, streamed=False), TF.rgb_to_grayscale(colour))


# -- probabilities, top-k, the CSV ---------------------------------------------------------------------------------


def _two_peers() -> dict[str, torch.nn.Module]:
    nets = {}
    for seed, name in [(1, "peerA"), (2, "peerB")]:
        torch.manual_seed(seed)
        nets[name] = build_model("cnn_small", 10, 1, 8).eval()
    return nets


def test_the_ensemble_is_the_mean_of_the_peers_softmax_and_a_peer_its_own():
    nets = _two_peers()
    x = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        p = {k: torch.softmax(m(normalize(x, DIGITS)), 1) for k, m in nets.items()}
    ens = PeerProbabilities(nets, DIGITS, "ensemble")(x)
    torch.testing.assert_close(ens, (p["peerA"] + p["peerB"]) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(PeerProbabilities(nets, DIGITS, "peerB")(x), p["peerB"], rtol=0, atol=1e-6)
    assert not torch.allclose(ens, p["peerA"], atol=1e-3)
    with pytest.raises(ConfigError, match="--peer: 'peerC' is not a peer of this run .its peers: peerA, peerB."):
        PeerProbabilities(nets, DIGITS, "peerC")


def test_top_k_is_most_probable_first():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    idx, val = top_k(probs, 2)
    assert idx.tolist() == [[1, 2], [0, 2]] and np.allclose(val, [[0.6, 0.3], [0.5, 0.3]])
    assert top_k(probs, 7)[0].shape == (2, 3)  # k above the class count: every class


def test_the_csv_has_timms_columns_one_row_per_image_and_is_written_atomically(tmp_path):
    out = tmp_path / "preds.csv"
    names = ["cat", "dog", "eel"]
    with PredictionCsv(out, 2, names) as w:
        w.write(["a.png", "b.png"], np.array([[1, 2], [0, 2]]), np.array([[0.6, 0.3], [0.5, 0.25]]))
        assert not out.exists()  # rows go to a temporary name until the file is complete
    rows = list(csv.reader(out.open()))
    assert rows[0] == csv_header(2) == ["filename", "index_0", "index_1", "label_0", "label_1", "prob_0", "prob_1"]
    assert rows[1:] == [
        ["a.png", "1", "2", "dog", "eel", "0.6", "0.3"],
        ["b.png", "0", "2", "cat", "eel", "0.5", "0.25"],
    ]
    with pytest.raises(RuntimeError), PredictionCsv(tmp_path / "broken.csv", 2, names) as w:
        w.write(["a.png"], np.array([[1, 2]]), np.array([[0.6, 0.3]]))
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]  # no half file, no temporary left


def test_unreadable_files_are_listed_counted_and_skipped(tmp_path, capsys):
    good = []
    for i in range(5):
        good.append(_save(tmp_path / "in" / f"{i}.png", np.full((8, 8), 30 * i, dtype=np.uint8)))
    bad = _bad_files(tmp_path / "in")
    files = list_images([str(tmp_path / "in")])
    assert len(files) == 7
    probs_of = PeerProbabilities(_two_peers(), DIGITS)
    with PredictionCsv(tmp_path / "p.csv", 3, [str(i) for i in range(10)]) as out:
        predict_local(probs_of, files, out, streamed=False, batch_size=4, workers=0)
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert [r["filename"] for r in rows] == [str(p) for p in good]
    assert out.rows == 5 and sorted(f for f, _ in out.unreadable) == sorted(str(p) for p in bad)
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("cmd-dist: skipped unreadable image ") for line in err) == 2
    assert any("truncated.jpg: " in line and "truncated" in line.rsplit(":", 1)[-1] for line in err)


# -- the command on a real run -------------------------------------------------------------------------------------


def _digit_pngs(folder: Path, n: int) -> tuple[list[Path], torch.Tensor]:
    from cmd_dist.data.resident import load_digits

    x, _ = load_digits("test")
    paths = [_save(folder / f"d{i:03d}.png", x[i, 0].numpy()) for i in range(n)]
    return paths, x[:n]


def _direct(run: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each peer's softmax from the run's best checkpoint, loaded directly (no predict code)."""
    from cmd_dist.infer.loading import open_trained_run

    trained = open_trained_run(str(run), "best")
    with torch.no_grad():
        return {k: torch.softmax(m(normalize(x, DIGITS)), 1) for k, m in trained.models().items()}


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_predict_on_a_run_gives_the_loaded_peers_probabilities(trained_run, tmp_path, capsys):
    from cmd_dist.cli import main

    paths, x = _digit_pngs(tmp_path / "imgs", 40)
    _bad_files(tmp_path / "imgs")
    p = _direct(trained_run, x)
    ens = (p["peerA"] + p["peerB"]) / 2
    out = tmp_path / "preds.csv"
    assert main(["predict", str(trained_run), str(tmp_path / "imgs"), "--out", str(out), "--topk", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "predicted 40 images with the ensemble of peerA, peerB (best_checkpoint, epoch 2); 2 unreadable" in stdout
    rows = _read(out)
    assert [r["filename"] for r in rows] == [str(q) for q in paths]
    for r, probs in zip(rows, ens):
        want = torch.topk(probs, 3)
        assert [int(r[f"index_{i}"]) for i in range(3)] == want.indices.tolist()
        assert [r[f"label_{i}"] for i in range(3)] == [str(i) for i in want.indices.tolist()]
        assert np.allclose([float(r[f"prob_{i}"]) for i in range(3)], want.values.numpy(), atol=1e-5)
    # one peer: its own softmax; where the peers disagree the ensemble's row differs from each peer's
    assert (
        main(["predict", str(trained_run), *map(str, paths), "--out", str(tmp_path / "a.csv"), "--peer", "peerA"]) == 0
    )
    rows_a = _read(tmp_path / "a.csv")
    assert [int(r["index_0"]) for r in rows_a] == p["peerA"].argmax(1).tolist()
    assert np.allclose([float(r["prob_0"]) for r in rows_a], p["peerA"].max(1).values.numpy(), atol=1e-5)
    assert any(r["prob_0"] != ra["prob_0"] for r, ra in zip(rows, rows_a))


def test_predict_bad_peer_or_checkpoint_is_one_line(trained_run, tmp_path, capsys):
    from cmd_dist.cli import main

    _digit_pngs(tmp_path / "imgs", 2)
    for extra, message in [
        (["--peer", "peerC"], "--peer: 'peerC' is not a peer of"),
        (["--checkpoint", "1"], "--checkpoint 1: "),
        (["--topk", "0"], "--topk 0: must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["predict", str(trained_run), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.csv"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "p.csv").exists()


def test_digits_written_as_png_read_back_to_the_training_pixels(tmp_path):
    paths, x = _digit_pngs(tmp_path, 6)
    for path, want in zip(paths, x):
        view = eval_transform(read_image(path.read_bytes()), DIGITS, streamed=False)
        assert torch.equal(view, want)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, "PNG")
    assert read_image(buf.getvalue()).shape == (3, 4, 4)


def test_a_jpeg_folder_of_a_streamed_run_shape(tmp_path):
    write_jpeg(tmp_path / "a" / "x.jpg", 0, 1, (40, 48))
    spec = DatasetSpec(5, 3, 16, 0, True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    view = eval_transform(read_image((tmp_path / "a" / "x.jpg").read_bytes()), spec, streamed=True)
    assert view.shape == (3, 16, 16) and view.dtype == torch.uint8


def test_only_unreadable_files_is_one_error_and_no_csv(trained_run, tmp_path, capsys):
    from cmd_dist.cli import main

    _bad_files(tmp_path / "imgs")
    with pytest.raises(SystemExit) as e:
        main(["predict", str(trained_run), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 3  # the two files, then the error
    assert err[-1] == "cmd-dist: error: none of the 2 files under INPUT is a readable image (listed above)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no CSV, no temporary file
