"""The names of a dataset's classes, in label order, for the tables, CSVs and exported files that show them.

Each comes from the dataset's own files, read as untrusted: CIFAR-100's ``meta`` pickle (``fine_label_names``, or
``coarse_label_names`` for CIFAR-100N's 20-superclass task) and CIFAR-10's ``batches.meta`` (``label_names``) through
the restricted unpickler of :mod:`cmd_dist.data.resident`; digits are "0".."9"; an image folder's classes are its
sorted ``train/`` class folders (the labels :func:`cmd_dist.data.image_lists.read_imagefolder` gives); Food-101(N)
its ``classes.txt``; mini-WebVision the first N lines of ``info/synsets.txt`` (``n01440764 tench, Tinca tinca``:
the words after the synset id). Where the file is absent or unreadable, or holds another number of classes than
the run's, the names are "0".."N-1": a name is a label for people, never a reason to refuse a run.
"""

from __future__ import annotations

import os
from pathlib import Path

from cmd_dist.data.labels import uses_coarse_labels
from cmd_dist.data.types import SPECS
from cmd_dist.errors import DataError


def numbered(num_classes: int) -> list[str]:
    """ "0".."N-1": the names of classes whose files name none."""
    return [str(i) for i in range(num_classes)]


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def cifar_names(dataset: str, root: str | Path, coarse: bool = False) -> list[str]:
    """CIFAR-100 (fine or coarse) or CIFAR-10 class names from the pickle's meta file ([] when unreadable)."""
    from cmd_dist.data.resident import safe_unpickle

    if dataset == "cifar100":
        path, key = Path(root) / "cifar-100-python" / "meta", "coarse_label_names" if coarse else "fine_label_names"
    else:
        path, key = Path(root) / "cifar-10-batches-py" / "batches.meta", "label_names"
    if not path.is_file():
        return []
    try:
        names = safe_unpickle(path).get(key)
    except DataError:
        return []
    if not isinstance(names, list):
        return []
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def imagefolder_names(root: str | Path) -> list[str]:
    """An image folder's classes: ``train/``'s class folders, sorted (the order its labels follow)."""
    train = Path(root).expanduser() / "train"
    if not train.is_dir():
        return []
    return sorted(e.name for e in os.scandir(train) if e.is_dir())


def food101_names(root: str | Path, train_set: str = "food101n") -> list[str]:
    """Food-101's 101 classes (``Food-101N_release/meta/classes.txt`` first when training on Food-101N, as the file
    lists are read; its ``class_name`` header skipped)."""
    root = Path(root).expanduser()
    files = [root / "food-101" / "meta" / "classes.txt"]
    if train_set == "food101n":
        files.insert(0, root / "Food-101N_release" / "meta" / "classes.txt")
    for path in files:
        if path.is_file():
            lines = _lines(path)
            return lines[1:] if lines and lines[0].startswith("class_name") else lines
    return []


def webvision_names(root: str | Path, num_classes: int) -> list[str]:
    """The first ``num_classes`` lines of ``webvision/info/synsets.txt``, the words after the synset id."""
    lines = _lines(Path(root).expanduser() / "webvision" / "info" / "synsets.txt")[:num_classes]
    return [ln.split(None, 1)[1] if len(ln.split(None, 1)) == 2 else ln for ln in lines]


def class_names(data_cfg, noise_cfg=None, num_classes: int | None = None) -> list[str]:
    """The run's class names in label order.

    ``num_classes``: the run's class count, where the caller knows it (the trained classifier's): names of another
    count are replaced by "0".."N-1". Without it, a resident dataset's count is its spec's, a streamed one's the
    count of names found ([] when none is found).
    """
    ds = data_cfg.dataset
    coarse = uses_coarse_labels(noise_cfg)
    if num_classes is None and ds in SPECS:
        num_classes = 20 if coarse else SPECS[ds].num_classes
    if num_classes is None and ds == "webvision":
        num_classes = data_cfg.num_classes or 50
    if ds == "digits":
        names = numbered(10)
    elif ds in ("cifar10", "cifar100"):
        names = cifar_names(ds, data_cfg.root, coarse)
    elif ds == "imagefolder":
        names = imagefolder_names(data_cfg.root)
    elif ds == "food101n":
        names = food101_names(data_cfg.root, data_cfg.food_train)
    elif ds == "webvision":
        names = webvision_names(data_cfg.root, num_classes)
    else:
        names = []
    if num_classes is None:
        return names
    return names if len(names) == num_classes else numbered(num_classes)
