"""The file lists of the streamed datasets: mini-WebVision, Food-101N and any ImageFolder layout.

Only the lists live in memory (paths as one numpy bytes array, so forked loader workers share it without
copying); no image is opened here. Each reader checks its layout and raises a one-line :class:`DataError`
naming the file or folder that is missing or malformed.

Each :class:`ImageList` knows, per image, its index in the list as the reader read it (``origin``, composed through
every :meth:`ImageList.take`) and that list's length (``shipped``): a subset, a held-out split or Food-101N's removal
of the verified-val images keep naming each image by its place in the dataset as shipped, which
``cmd-dist label-issues`` needs for ``detection.npy`` (CIFAR-N's detection format, one entry per shipped image;
docs/label_issues.md). The order a reader reads:

- :func:`read_imagefolder`: the class folders of ``train/`` sorted by name, and in each the image files sorted by
  name (both by Unicode code point, Python's ``sorted``), not recursing into subfolders: torchvision's
  ``ImageFolder`` order for flat class folders of ``.jpg``/``.jpeg``/``.png``/``.webp`` files;
- :func:`read_webvision`: the lines of ``train_filelist_<source>.txt`` in file order, the sources in
  ``data.webvision_sources`` order, keeping the lines whose label is below ``data.num_classes``;
- :func:`read_food101n`: the lines of ``meta/imagelist.tsv`` in file order (header skipped), or of Food-101's
  ``meta/train.txt`` with ``data.food_train: food101``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmd_dist.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


@dataclass
class ImageList:
    """Paths (relative to ``base``), the labels trained or scored on, the clean labels (-1: unknown), and each
    image's index in the list as read (``origin``, of ``shipped`` images; the module docstring)."""

    base: Path
    rel: np.ndarray  # bytes paths, dtype "S"
    labels: np.ndarray  # int64
    clean: np.ndarray  # int64, -1 where the correct class is not known
    name: str = ""
    #: int64, per image: its index in the list as read; None on construction = this list is the one read.
    origin: np.ndarray = None  # type: ignore[assignment]  # filled by __post_init__
    #: The length of the list as read (-1 on construction: this list's length).
    shipped: int = -1

    def __post_init__(self) -> None:
        if self.origin is None:
            if self.shipped not in (-1, len(self)):
                raise ValueError(f"ImageList: shipped={self.shipped} without an origin for {len(self)} images")
            self.origin = np.arange(len(self), dtype=np.int64)
            self.shipped = len(self)
        elif self.shipped < 0:
            raise ValueError("ImageList: an origin needs the shipped list's length")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> Path:
        return self.base / self.rel[i].decode()

    def take(self, idx: np.ndarray, name: str | None = None) -> ImageList:
        """The images at positions ``idx`` of this list, still named by their index in the list as read."""
        return ImageList(
            self.base,
            self.rel[idx],
            self.labels[idx],
            self.clean[idx],
            name or self.name,
            self.origin[idx],
            self.shipped,
        )

    def relabelled(self, labels: np.ndarray, clean: np.ndarray) -> ImageList:
        """The same images (paths, origin) with other labels."""
        return dataclasses.replace(self, labels=labels, clean=clean)


def _image_list(base: Path, rel: list[str], labels: list[int], clean=None, name: str = "") -> ImageList:
    lab = np.asarray(labels, dtype=np.int64)
    cl = lab.copy() if clean is None else np.asarray(clean, dtype=np.int64)
    return ImageList(base, np.array([r.encode() for r in rel], dtype=np.bytes_), lab, cl, name)


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} {path} not found; set data.root to the folder that holds it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} could not be read ({type(e).__name__})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _path_label_list(path: Path, what: str, num_classes: int) -> tuple[list[str], list[int]]:
    """``relative/path label`` lines (the WebVision info lists), keeping labels below num_classes."""
    rel, labels = [], []
    for n, line in enumerate(_read_lines(path, what), 1):
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{what} {path} line {n}: expected 'PATH LABEL', got {line[:80]!r}")
        y = int(parts[1])
        if y < 0:
            raise DataError(f"{what} {path} line {n}: negative label {y}")
        if y < num_classes:
            rel.append(parts[0])
            labels.append(y)
    return rel, labels


def read_webvision(root: Path, num_classes: int, sources: tuple[str, ...] = ("google",)) -> dict[str, ImageList]:
    """WebVision 1.0 (DivideMix layout): train lists, WebVision val, ImageNet val when present.

    ``webvision/info/train_filelist_<source>.txt`` (``google``: the "Mini" setting; add ``flickr`` for the full
    2.4M-image set) and ``val_filelist.txt`` hold ``path label`` lines; the first ``num_classes`` classes are kept.
    ``imagenet/val/<c>/`` (c = 0..num_classes-1, or the synset id of ``webvision/info/synsets.txt`` line c) is the
    ILSVRC12 test set of the "Mini" setting.
    """
    wv = root / "webvision"
    rel, y = [], []
    lists = [wv / "info" / f"train_filelist_{source}.txt" for source in sources]
    for path in lists:
        r, labels = _path_label_list(path, "WebVision train list", num_classes)
        rel += r
        y += labels
    names = " + ".join(str(p) for p in lists)
    if not rel:
        raise DataError(f"WebVision train list {names} has no image of the first {num_classes} classes")
    if max(y) < num_classes - 1:
        raise DataError(
            f"WebVision train list {names} has labels 0..{max(y)} only; "
            f"data.num_classes={num_classes} needs 0..{num_classes - 1} (set data.num_classes={max(y) + 1})"
        )
    out = {"train": _image_list(wv, rel, y, np.full(len(y), -1), "webvision-train")}
    vrel, vy = _path_label_list(wv / "info" / "val_filelist.txt", "WebVision val list", num_classes)
    val_dir = wv / "val_images_256"
    if not val_dir.is_dir():
        raise DataError(f"WebVision val folder {val_dir} not found; it holds the images of val_filelist.txt")
    out["webvision_val"] = _image_list(val_dir, vrel, vy, name="webvision-val")
    inet = root / "imagenet" / "val"
    if inet.is_dir():
        synsets_file = wv / "info" / "synsets.txt"
        synsets = [ln.split()[0] for ln in _read_lines(synsets_file, "synsets")] if synsets_file.is_file() else []
        irel, iy = [], []
        for c in range(num_classes):
            folder = inet / str(c)
            if not folder.is_dir() and c < len(synsets) and (inet / synsets[c]).is_dir():
                folder = inet / synsets[c]
            if not folder.is_dir():
                raise DataError(
                    f"ImageNet val class folder {inet / str(c)} not found (class {c} of "
                    f"data.num_classes={num_classes}); add it or remove {inet}"
                )
            files = _images_in(folder)
            irel += [f"{folder.name}/{f}" for f in files]
            iy += [c] * len(files)
        out["imagenet_val"] = _image_list(inet, irel, iy, name="imagenet-val")
    return out


def _images_in(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _skip_header(lines: list[str]) -> list[str]:
    return lines[1:] if lines and lines[0].startswith("class_name") else lines


def read_food101n(root: Path, train_set: str = "food101n") -> dict[str, ImageList]:
    """Food-101N (Lee et al. 2018) training images, tested on Food-101's clean test set.

    ``Food-101N_release/meta/imagelist.tsv`` lists the 310k noisy web images (``class/key.jpg``);
    ``verified_train.tsv`` / ``verified_val.tsv`` carry a human verification flag for some of them
    (1: the label is right). Those flags give the clean labels we know (verified right) and the noise
    rate (the share verified wrong). ``train_set: food101`` trains on Food-101's own 75,750 training
    images instead (``food-101/meta/train.txt``; the setting of the CMD paper's appendix A.1).
    """
    food = root / "food-101"
    classes_file = food / "meta" / "classes.txt"
    rel_root = root / "Food-101N_release"
    if train_set == "food101n":
        classes_file = (
            rel_root / "meta" / "classes.txt" if (rel_root / "meta" / "classes.txt").is_file() else classes_file
        )
    classes = _skip_header(_read_lines(classes_file, "Food-101 class list"))
    index = {c: i for i, c in enumerate(classes)}

    def label_of(entry: str, where: Path, n: int) -> int:
        cls = entry.split("/", 1)[0]
        if cls not in index:
            raise DataError(f"{where} line {n}: class {cls!r} is not in {classes_file}")
        return index[cls]

    test_file = food / "meta" / "test.txt"
    tlines = _read_lines(test_file, "Food-101 test list")
    trel = [f"{e}.jpg" if not e.lower().endswith(IMAGE_EXTENSIONS) else e for e in tlines]
    ty = [label_of(e, test_file, n) for n, e in enumerate(tlines, 1)]
    _require_dir(food / "images", "Food-101 image folder")
    out = {"test": _image_list(food / "images", trel, ty, name="food101-test"), "classes": classes}

    if train_set == "food101":
        f = food / "meta" / "train.txt"
        lines = _read_lines(f, "Food-101 train list")
        rel = [f"{e}.jpg" if not e.lower().endswith(IMAGE_EXTENSIONS) else e for e in lines]
        y = [label_of(e, f, n) for n, e in enumerate(lines, 1)]
        out["train"] = _image_list(food / "images", rel, y, np.full(len(y), -1), "food101-train")
        return out

    f = rel_root / "meta" / "imagelist.tsv"
    lines = _skip_header(_read_lines(f, "Food-101N image list"))
    y = [label_of(e, f, n) for n, e in enumerate(lines, 2)]
    _require_dir(rel_root / "images", "Food-101N image folder")
    train = _image_list(rel_root / "images", lines, y, np.full(len(y), -1), "food101n-train")
    position = {e: i for i, e in enumerate(lines)}
    verified = {
        split: _verified_flags(rel_root / "meta" / f"verified_{split}.tsv", position) for split in ("train", "val")
    }
    for split in ("train", "val"):
        ids, flags = verified[split]
        train.clean[ids[flags == 1]] = train.labels[ids[flags == 1]]
    out["train"] = train
    out["verified"] = verified  # type: ignore[assignment]  # consumed by build_streamed
    return out


def _verified_flags(vf: Path, position: dict[str, int]) -> np.ndarray:
    """int64 [2, n]: positions in the image list and the verification flags (1: the label is right) of a
    ``verified_*.tsv`` list."""
    rows = _skip_header(_read_lines(vf, f"Food-101N {vf.stem} list"))
    ids, flags = [], []
    for n, row in enumerate(rows, 2):
        parts = row.split("\t") if "\t" in row else row.split()
        if len(parts) != 2 or parts[1] not in ("0", "1"):
            raise DataError(f"{vf} line {n}: expected 'class/key.jpg<TAB>0|1', got {row[:80]!r}")
        if parts[0] in position:  # verified images outside the image list are not ours to score
            ids.append(position[parts[0]])
            flags.append(int(parts[1]))
    return np.array([ids, flags], dtype=np.int64).reshape(2, -1)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} {path} not found; set data.root to the folder that holds it")


def read_imagefolder(root: Path) -> dict[str, ImageList]:
    """``train/<class>/*``, ``val/<class>/*`` (optional), ``test/<class>/*``: classes are train's folders, sorted."""
    train_dir = root / "train"
    _require_dir(train_dir, "image folder train split")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError(f"image folder {train_dir} has no class folders; expected train/<class>/<image>")
    out = {}
    for split in ("train", "val", "test"):
        d = root / split
        if not d.is_dir():
            continue
        present = sorted(e.name for e in os.scandir(d) if e.is_dir())
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DataError(f"image folder {d} has class folder(s) {', '.join(unknown[:5])} that train/ lacks")
        missing = sorted(set(classes) - set(present))
        if missing:
            raise DataError(f"image folder {d} lacks class folder(s) {', '.join(missing[:5])} that train/ has")
        rel, y = [], []
        for c, name in enumerate(classes):
            files = _images_in(d / name)
            rel += [f"{name}/{f}" for f in files]
            y += [c] * len(files)
        if not rel:
            raise DataError(f"image folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        out[split] = _image_list(d, rel, y, name=f"imagefolder-{split}")
    out["classes"] = classes  # type: ignore[assignment]
    return out
