"""``cmd-dist export``: one peer, or the peers' ensemble, as a file that loads without cmd-dist.

Every format takes the same input and gives the same output, and carries the same description (:func:`describe`):

- input: float32 images ``[N, C, H, W]`` with values in 0..1 (what torchvision's ``ToTensor`` / ``to_dtype(...,
  scale=True)`` gives), already at the run's input size (a streamed dataset's evaluation view: resize the shorter
  side to ``size / 0.875``, centre crop ``size``; CIFAR and digits images as they are). Float rather than uint8, so a
  resized (interpolated) image needs no rounding back and ONNX runtimes take it as is. The run's normalisation
  ``(x - mean) / std`` is inside the model;
- output: class probabilities ``[N, classes]``: a peer's softmax, the ensemble's mean of its peers' softmax outputs
  (the ensemble ``cmd-dist evaluate`` scores).

Formats: ``torchscript`` (``torch.jit.trace`` of the module, loaded with ``torch.jit.load``; the description in the
archive's extra file ``cmd_dist.json``), ``onnx`` (torch's dynamo exporter, opset 18, a dynamic batch axis; class
names, architecture and normalisation in the model's ``metadata_props``; runs in onnxruntime) and ``safetensors``
(weights only: one peer's state dict, or every peer's under ``<peer name>.``; the description in the header's
metadata and in a JSON file beside it, ``<file>.json``). Files are written atomically.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from cmd_dist.data.views import EVAL_CROP_FRACTION
from cmd_dist.errors import RunError
from cmd_dist.infer.loading import BEST, TrainedRun
from cmd_dist.runs.fs import atomic_write_bytes, split_location

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}
ENSEMBLE = "ensemble"
ONNX_OPSET = 18


class Probabilities(nn.Module):
    """Normalise 0..1 float images with the run's mean and std, then the mean of the members' softmax outputs."""

    def __init__(self, nets: list[nn.Module], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        probs = [torch.softmax(net(x), dim=1) for net in self.nets]
        return torch.stack(probs).mean(0)


def members(trained: TrainedRun, peer: str) -> list[str]:
    """The peers a ``--peer`` value exports: one peer's name, or every peer for ``ensemble``."""
    if peer == ENSEMBLE:
        return list(trained.peer_names)
    return [trained.peer_names[trained.peer_index(peer)]]


def build_module(trained: TrainedRun, peer: str = ENSEMBLE) -> Probabilities:
    """The module every format holds (in eval mode, on the CPU)."""
    nets = [trained.model(name) for name in members(trained, peer)]
    return Probabilities(nets, trained.spec.mean, trained.spec.std).eval()


def describe(trained: TrainedRun, peer: str, fmt: str) -> dict:
    """What the file is: the run, checkpoint, peers, architectures, classes, input and normalisation."""
    spec = trained.spec
    archs = {p.name: p.arch for p in trained.cfg.peers}
    if trained.streamed:
        view = (
            f"RGB; resize the shorter side to {round(spec.size / EVAL_CROP_FRACTION)}, centre crop "
            f"{spec.size}x{spec.size}, then scale to 0..1"
        )
    elif trained.cfg.data.dataset == "digits":
        view = "8x8 grey scikit-learn digits; their 0..16 values divided by 16"
    else:
        view = f"{spec.size}x{spec.size} RGB (CIFAR), scaled to 0..1"
    return {
        "producer": "cmd-dist",
        "format": fmt,
        "run": trained.run,
        "checkpoint": trained.checkpoint,
        "epoch": trained.epoch,
        "model": peer,
        "peers": members(trained, peer),
        "architectures": {name: archs[name] for name in members(trained, peer)},
        "dataset": trained.cfg.data.dataset,
        "num_classes": spec.num_classes,
        "class_names": trained.class_names,
        "input": {"layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "channels": spec.channels,
                  "height": spec.size, "width": spec.size, "view": view},
        "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "inside": fmt != "safetensors"},
        "output": _output(peer, fmt),
    }  # fmt: skip


def _output(peer: str, fmt: str) -> str:
    ensemble = "the mean of the peers' softmax outputs"
    if fmt == "safetensors":
        return "weights only: each network takes (x - mean) / std and gives logits [N, classes]" + (
            f"; the ensemble is {ensemble}" if peer == ENSEMBLE else ""
        )
    return "class probabilities [N, classes]: " + (ensemble if peer == ENSEMBLE else "the peer's softmax")


def default_out(trained: TrainedRun, peer: str, fmt: str) -> Path:
    """``<run name>-<peer or ensemble>-<best | epochN><ext>`` in the current folder."""
    which = "best" if trained.checkpoint == BEST else f"epoch{trained.epoch}"
    return Path(f"{split_location(trained.run)[1]}-{peer}-{which}{FORMATS[fmt]}")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise RunError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def example_input(trained: TrainedRun, batch: int = 2) -> torch.Tensor:
    spec = trained.spec
    return torch.rand(batch, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))


def torchscript_bytes(module: Probabilities, example: torch.Tensor, meta: dict) -> bytes:
    with warnings.catch_warnings():  # torch 2.x deprecates TorchScript in favour of torch.export (the ONNX path)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, example)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"cmd_dist.json": json.dumps(meta)})
    return buf.getvalue()


def onnx_bytes(module: Probabilities, example: torch.Tensor, meta: dict) -> bytes:
    try:
        import onnx
    except ImportError:
        raise RunError("--format onnx needs the onnx and onnxscript packages: pip install 'cmd-dist[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    model = program.model_proto
    props = {
        "class_names": json.dumps(meta["class_names"]),
        "architecture": json.dumps(meta["architectures"]),
        "normalisation": json.dumps(meta["normalisation"]),
        "input": json.dumps(meta["input"]),
        "cmd_dist": json.dumps(meta),
    }
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def safetensors_bytes(trained: TrainedRun, peer: str, meta: dict) -> bytes:
    from safetensors.torch import save

    names = members(trained, peer)
    tensors = {}
    for name in names:
        prefix = f"{name}." if peer == ENSEMBLE else ""
        for key, t in trained.states[trained.peer_index(name)]["model"].items():
            tensors[prefix + key] = t.detach().cpu().contiguous()
    return save(tensors, metadata={"cmd_dist": json.dumps(meta)})


def export_run(trained: TrainedRun, fmt: str, peer: str = ENSEMBLE, out: str | Path | None = None) -> list[Path]:
    """Write ``trained``'s ``peer`` (or ensemble) in format ``fmt``; returns the files written."""
    check_format(fmt)
    members(trained, peer)  # an unknown peer: one line, before anything is built
    path = Path(out).expanduser() if out else default_out(trained, peer, fmt)
    if not path.parent.is_dir():
        raise RunError(f"--out: folder {path.parent} does not exist; create it or choose another path")
    meta = describe(trained, peer, fmt)
    if fmt == "safetensors":
        if peer == ENSEMBLE:
            meta["tensor_prefixes"] = {name: f"{name}." for name in meta["peers"]}
        atomic_write_bytes(path, safetensors_bytes(trained, peer, meta))
        sidecar = path.with_name(path.name + ".json")
        atomic_write_bytes(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
        return [path, sidecar]
    module = build_module(trained, peer)
    example = example_input(trained)
    data = torchscript_bytes(module, example, meta) if fmt == "torchscript" else onnx_bytes(module, example, meta)
    atomic_write_bytes(path, data)
    return [path]
