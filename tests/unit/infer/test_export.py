"""`cmd-dist export`: every format loads in a fresh Python process that cannot import cmd_dist (`python -I` in a
temporary folder, with an import hook that refuses cmd_dist: the project is installed editable in the venv), ONNX
through onnxruntime; their outputs match the in-process module's to 1e-4 and give `evaluate`'s accuracy on the
test split; the descriptions (class names, architecture, normalisation) are in each file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cmd_dist.cli import main
from cmd_dist.data.resident import load_split
from cmd_dist.infer.evaluate import evaluate_run
from cmd_dist.infer.export import build_module
from cmd_dist.infer.loading import open_trained_run

#: Runs first in the fresh process: cmd_dist (and tune) cannot be imported there.
NO_CMD_DIST = """
import sys

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cmd_dist", "tune"):
            raise ImportError(f"{name} is not available in this process")
        return None

sys.meta_path.insert(0, _Refuse())
try:
    import cmd_dist  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("cmd_dist was importable")
"""

LOAD_ALL = """
import json
import numpy as np
import onnx
import onnxruntime
import torch
from safetensors import safe_open
from safetensors.torch import load_file

x = np.load("x.npy")
out = {}
for name in ("peerA", "ensemble"):
    extra = {"cmd_dist.json": ""}
    module = torch.jit.load(f"{name}.pt", _extra_files=extra)
    with torch.no_grad():
        out[f"ts_{name}"] = module(torch.from_numpy(x)).numpy()
    out[f"ts_{name}_meta"] = json.loads(extra["cmd_dist.json"])
session = onnxruntime.InferenceSession("ensemble.onnx")
out["onnx_input"] = [i.name for i in session.get_inputs()]
out["onnx_ensemble"] = session.run(None, {"image": x})[0]
out["onnx_one"] = session.run(None, {"image": x[:1]})[0]
model = onnx.load("ensemble.onnx")
out["onnx_props"] = {p.key: p.value for p in model.metadata_props}
out["onnx_opset"] = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
weights = load_file("ensemble.safetensors")
out["st_keys"] = sorted(weights)
out["st_sum"] = {k: float(v.double().sum()) for k, v in weights.items()}
with safe_open("ensemble.safetensors", "pt") as f:
    out["st_meta"] = json.loads(f.metadata()["cmd_dist"])
out["st_sidecar"] = json.load(open("ensemble.safetensors.json"))
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("cmd_dist", "tune"))
np.save("probs.npy", {k: v for k, v in out.items() if isinstance(v, np.ndarray)}, allow_pickle=True)
json.dump({k: v for k, v in out.items() if not isinstance(v, np.ndarray)}, open("out.json", "w"))
"""


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """Every format of the run's last checkpoint (the ensemble; TorchScript of peerA too), and the test split as
    0..1 floats, in one folder; then the fresh process's results in it."""
    folder = tmp_path_factory.mktemp("exported")
    run = str(trained_run)
    for fmt, peer, name in [
        ("torchscript", "peerA", "peerA.pt"),
        ("torchscript", "ensemble", "ensemble.pt"),
        ("onnx", "ensemble", "ensemble.onnx"),
        ("safetensors", "ensemble", "ensemble.safetensors"),
    ]:
        argv = ["export", run, "--checkpoint", "last", "--format", fmt, "--peer", peer, "--out", str(folder / name)]
        assert main(argv) == 0
    x, y = load_split("digits", "", "test")
    np.save(folder / "x.npy", (x[:300].float() / 255.0).numpy())
    np.save(folder / "y.npy", y[:300].numpy())
    script = textwrap.dedent(NO_CMD_DIST) + textwrap.dedent(LOAD_ALL)
    proc = subprocess.run([sys.executable, "-I", "-c", script], cwd=folder, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def _results(folder: Path) -> tuple[dict, dict]:
    arrays = np.load(folder / "probs.npy", allow_pickle=True).item()
    return arrays, json.loads((folder / "out.json").read_text())


def test_the_fresh_process_had_no_cmd_dist(exported):
    _, out = _results(exported)
    assert out["modules"] == []


def test_outputs_match_the_in_process_model_and_evaluates_accuracy(trained_run, exported):
    arrays, _ = _results(exported)
    trained = open_trained_run(str(trained_run), "last")
    x = torch.from_numpy(np.load(exported / "x.npy"))
    y = np.load(exported / "y.npy")
    with torch.no_grad():
        want = {peer: build_module(trained, peer)(x).numpy() for peer in ("peerA", "ensemble")}
    assert np.abs(arrays["ts_peerA"] - want["peerA"]).max() < 1e-4
    for key in ("ts_ensemble", "onnx_ensemble"):
        assert np.abs(arrays[key] - want["ensemble"]).max() < 1e-4
    assert np.abs(arrays["onnx_one"] - want["ensemble"][:1]).max() < 1e-4  # the batch axis is dynamic
    rows = {r["name"]: r for r in evaluate_run(str(trained_run), "last")["models"]}
    for key, model in [("ts_peerA", "peerA"), ("ts_ensemble", "ensemble"), ("onnx_ensemble", "ensemble")]:
        accuracy = 100.0 * float((arrays[key].argmax(1) == y).mean())
        assert accuracy == pytest.approx(rows[model]["top1"], abs=1e-4)


def test_descriptions_name_classes_architecture_and_normalisation(exported):
    _, out = _results(exported)
    props = out["onnx_props"]
    assert json.loads(props["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(props["architecture"]) == {"peerA": "cnn_small", "peerB": "cnn_small"}
    assert json.loads(props["normalisation"]) == {"mean": [0.3], "std": [0.35], "inside": True}
    assert out["onnx_opset"] >= 18 and out["onnx_input"] == ["image"]
    meta = out["ts_peerA_meta"]
    assert meta["peers"] == ["peerA"] and meta["epoch"] == 3 and meta["input"]["range"] == [0.0, 1.0]
    assert out["ts_ensemble_meta"]["peers"] == ["peerA", "peerB"]
    assert out["st_sidecar"] == out["st_meta"]
    assert out["st_sidecar"]["tensor_prefixes"] == {"peerA": "peerA.", "peerB": "peerB."}
    assert out["st_sidecar"]["normalisation"]["inside"] is False


def test_safetensors_holds_every_peers_weights(trained_run, exported):
    _, out = _results(exported)
    trained = open_trained_run(str(trained_run), "last")
    want = {
        f"{name}.{key}": float(t.double().sum())
        for k, name in enumerate(trained.peer_names)
        for key, t in trained.states[k]["model"].items()
    }
    assert out["st_keys"] == sorted(want)
    assert out["st_sum"] == pytest.approx(want, abs=1e-9)
