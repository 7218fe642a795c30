"""Human noisy labels for CIFAR: CIFAR-10N and CIFAR-100N (Wei et al., ICLR 2022, http://noisylabels.com).

The label files (``CIFAR-10_human.pt``, ``CIFAR-100_human.pt``, licence CC BY-NC 4.0) hold one label per
training image of the python-pickle CIFAR in its original order, beside the clean labels they were
collected against. Those clean labels are checked against the training set's own labels before any
noisy label is used: a file for another dataset or another image order is refused, never trained on.
The files are untrusted: ``torch.load(weights_only=True)`` with only numpy's array rebuild allowed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cmd_dist.errors import first_line

#: ``noise.label_set`` -> the key of that label set in the CIFAR-N file.
LABEL_SETS: dict[str, dict[str, str]] = {
    "cifar10": {
        "aggre": "aggre_label",
        "worst": "worse_label",
        "random1": "random_label1",
        "random2": "random_label2",
        "random3": "random_label3",
    },
    "cifar100": {"noisy_fine": "noisy_label", "noisy_coarse": "noisy_coarse_label"},
}
#: CIFAR-100N's coarse labels are the 20 superclasses: the run trains a 20-way classifier.
COARSE_SETS = {"noisy_coarse"}
FILE_NAMES = {"cifar10": "CIFAR-10_human.pt", "cifar100": "CIFAR-100_human.pt"}


class LabelFileError(RuntimeError):
    """A missing, unreadable or mismatched CIFAR-N file (the data layer turns it into a DataError)."""


def _numpy_safe_globals() -> list:
    """What torch's weights-only unpickler needs to rebuild plain numpy arrays, and nothing else."""
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        multiarray = np.core.multiarray
    allowed = [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles some dtypes by class
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in ("Int64DType", "Int32DType", "Int16DType", "UInt8DType")]
    return allowed


def label_file_path(dataset: str, root: str | Path, label_file: str | None) -> Path:
    """``noise.label_file`` when given, else ``<data.root>/cifar-n/<file>`` or ``<data.root>/<file>``."""
    name = FILE_NAMES[dataset]
    if label_file:
        path = Path(label_file).expanduser()
        if not path.is_file():
            raise LabelFileError(f"noise.label_file {path} not found; point it at the CIFAR-N file {name}")
        return path
    candidates = [Path(root) / "cifar-n" / name, Path(root) / name]
    for path in candidates:
        if path.is_file():
            return path
    raise LabelFileError(
        f"CIFAR-N label file {name} not found in {candidates[0].parent} or {candidates[1].parent}; "
        f"download it from http://noisylabels.com and set noise.label_file=PATH"
    )


def load_label_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's label arrays as int64 tensors (refuses anything but plain arrays and lists)."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused globals, truncated zip, not a torch file
        raise LabelFileError(f"CIFAR-N label file {path} could not be read safely ({first_line(e)[:160]})") from None
    if not isinstance(obj, dict):
        raise LabelFileError(f"CIFAR-N label file {path} does not hold a dict of label arrays")
    out = {}
    for key, value in obj.items():
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001 - an odd object is simply not a label array
            continue
        if arr.ndim == 1 and arr.dtype.kind in "iu":
            out[str(key)] = torch.from_numpy(arr.astype(np.int64))
    return out


def human_labels(dataset: str, label_set: str, path: Path, clean: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CIFAR-N's ``label_set`` for the training images whose clean labels are ``clean`` (full set, file order).

    Raises LabelFileError naming the file when it lacks the label set, has another length, or its
    clean labels disagree with ``clean`` (another dataset, another image order, a corrupted copy).
    """
    sets = LABEL_SETS.get(dataset)
    if sets is None or label_set not in sets:
        allowed = ", ".join(sets) if sets else "none"
        raise LabelFileError(f"noise.label_set {label_set!r} does not exist for {dataset}; choose {allowed}")
    labels = load_label_file(path)
    key = sets[label_set]
    clean_key = "clean_coarse_label" if label_set in COARSE_SETS else "clean_label"
    for k in (key, clean_key):
        if k not in labels:
            raise LabelFileError(
                f"CIFAR-N label file {path} has no {k!r} array (has {', '.join(sorted(labels)) or 'none'}); "
                f"is it {FILE_NAMES[dataset]}?"
            )
    noisy, file_clean = labels[key], labels[clean_key]
    n = clean.shape[0]
    if noisy.shape[0] != n or file_clean.shape[0] != n:
        raise LabelFileError(
            f"CIFAR-N label file {path} has {noisy.shape[0]} labels for {n} training images; "
            f"it belongs to another dataset than {dataset}"
        )
    wrong = (file_clean != clean.cpu()).nonzero()
    if wrong.numel():
        raise LabelFileError(
            f"CIFAR-N label file {path} disagrees with the {dataset} training labels at {wrong.numel()} of {n} "
            f"images (first at index {int(wrong[0])}); it is for other images or another image order"
        )
    if int(noisy.min()) < 0 or int(noisy.max()) >= num_classes:
        raise LabelFileError(f"CIFAR-N label file {path}: {key!r} has labels outside [0, {num_classes})")
    return noisy.to(clean.device)
