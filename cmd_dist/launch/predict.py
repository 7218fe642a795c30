"""``cmd-dist predict RUN INPUT... [--out preds.csv] [--topk K] [--peer NAME|ensemble] [--checkpoint ...]
[--address ADDR] [--batch-size N]``: the peers' top-k classes for new images, one CSV row per image.

Without ``--address`` it runs in this process (:func:`cmd_dist.infer.predict.predict_local`: a DataLoader, the GPU
when there is one) and Ray never starts. With ``--address`` (or ``local``: a fresh local Ray with token auth on
127.0.0.1, as ``cmd-dist train`` starts one) it goes through **Ray Data**, the batch-inference pattern of Ray's
docs ("Offline batch inference": read, ``map_batches`` with a callable class whose constructor loads the model once
per actor):

1. ``ray.data.read_binary_files(files, include_paths=True)`` reads the bytes where Ray schedules the read tasks;
2. ``map_batches(decode_views)`` (fused into those read tasks by Ray Data) decodes each file with the *same*
   :func:`cmd_dist.infer.images.read_image` and evaluation view as the local path, so both paths give the same
   rows; a file that does not decode becomes a row with its reason instead of failing the whole job.
   ``ray.data.read_images`` was not used: it decodes with PIL (other JPEG pixels than torchvision's libjpeg-turbo
   path, so other probabilities than the local path and than training's view of a streamed dataset) and one
   unreadable file fails the dataset;
3. ``map_batches(PeerPredictor, compute=ActorPoolStrategy(...))``: each actor builds the peers once, in its
   constructor, from the verified weights the driver loaded (they travel in Ray's object store with the callable,
   so actors never open the run folder: a run folder on the driver's disk serves a whole cluster); one GPU per
   actor (as many actors as GPUs) when the cluster has GPUs, else CPU actors of 0.5 CPU (a 2-CPU machine keeps
   1.5 CPUs for the read tasks and cannot deadlock) or 1 CPU from 4 CPUs on, one actor per 4 CPUs;
4. the driver writes the rows as they stream back, in the files' order (``preserve_order``), through the same
   atomic CSV writer as the local path.

The INPUT files are listed on the driver and read by Ray's tasks wherever they run: on a cluster they must be on a
filesystem every node mounts under the same path (NFS, a shared volume), as ``output_dir`` must be for training.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cmd_dist.errors import CheckpointError, ConfigError, DataError

#: Columns of the decoded batch (Ray Data stage 2) and of the predictions (stage 3).
PATH, VIEW, ERROR, INDEX, PROB = "path", "view", "error", "index", "prob"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="the peers' top-k classes for image files or folders, as a CSV")
    p.add_argument("run", metavar="RUN", help="a run folder (or URI) written by cmd-dist train")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--out", default="preds.csv", help="the CSV to write (default: preds.csv)")
    p.add_argument("--topk", type=int, default=5, help="classes per image, most probable first (default 5)")
    p.add_argument("--peer", default="ensemble", help="a peer's name, or ensemble: mean of the peers' softmax")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or an epoch number")
    p.add_argument("--address", help="Ray cluster address: predict with Ray Data there ('local': a local Ray)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    from cmd_dist.infer.images import list_images
    from cmd_dist.infer.predict import ENSEMBLE, PredictionCsv

    if args.topk < 1:
        raise ConfigError(f"--topk {args.topk}: must be at least 1")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    files = list_images(args.inputs)  # before the run is opened: a wrong INPUT fails at once
    from cmd_dist.infer.loading import open_trained_run

    try:
        trained = open_trained_run(args.run, args.checkpoint)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        if args.peer != ENSEMBLE and args.peer not in trained.peer_names:
            raise ConfigError(
                f"--peer: {args.peer!r} is not a peer of {args.run} (its peers: {', '.join(trained.peer_names)}); "
                f"name one of them, or ensemble"
            )
        k = min(args.topk, trained.spec.num_classes)
        with PredictionCsv(Path(args.out), k, trained.class_names) as out:
            if args.address:
                predict_on_ray(trained, files, out, args.peer, args.batch_size, args.address)
            else:
                _predict_here(trained, files, out, args.peer, args.batch_size)
            if out.rows == 0:
                raise DataError(f"none of the {len(files)} files under INPUT is a readable image (listed above)")
    finally:
        close = getattr(trained, "close", None)
        if close is not None:
            close()
    who = "the ensemble of " + ", ".join(trained.peer_names) if args.peer == ENSEMBLE else f"peer {args.peer}"
    skipped = f"; {len(out.unreadable)} unreadable skipped (listed above)" if out.unreadable else ""
    print(f"predicted {out.rows} images with {who} ({trained.checkpoint}, epoch {trained.epoch}){skipped}")
    print(f"predictions: {out.path}")
    return 0


def _predict_here(trained, files: list[str], out, peer: str, batch_size: int) -> None:
    import torch

    from cmd_dist.infer.predict import PeerProbabilities, predict_local

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probs_of = PeerProbabilities(trained.models(device), trained.spec, peer, device)
    predict_local(probs_of, files, out, _streamed(trained), batch_size)


def _streamed(trained) -> bool:
    from cmd_dist.data.types import STREAMED

    return trained.cfg.data.dataset in STREAMED


def portable(trained):
    """The run as the actors need it: config, spec, names and the loaded states; no staging folder of a URI run
    (that stays with the driver, which removes it)."""
    light = copy.copy(trained)
    if hasattr(light, "store"):
        light.store = None
    return light


def decode_views(batch: dict[str, np.ndarray], spec, streamed: bool) -> dict[str, np.ndarray]:
    """Ray Data stage 2: file bytes -> uint8 views (zeros where unreadable) and each file's reason ("" if read)."""
    from cmd_dist.infer.images import UnreadableImage, eval_transform, read_image

    n = len(batch["bytes"])
    views = np.zeros((n, spec.channels, spec.size, spec.size), dtype=np.uint8)
    errors = []
    for i, data in enumerate(batch["bytes"]):
        try:
            views[i] = eval_transform(read_image(bytes(data)), spec, streamed).numpy()
            errors.append("")
        except (UnreadableImage, RuntimeError, ValueError) as e:
            errors.append(str(e) or type(e).__name__)
    return {PATH: batch[PATH], VIEW: views, ERROR: np.asarray(errors, dtype=object)}


class PeerPredictor:
    """Ray Data stage 3, one per actor: the peers built once in the constructor, then top-k for every batch."""

    def __init__(self, trained, peer: str, k: int) -> None:
        import torch

        from cmd_dist.infer.predict import PeerProbabilities

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.probs_of = PeerProbabilities(trained.models(device), trained.spec, peer, device)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from cmd_dist.infer.predict import top_k

        ok = np.asarray([not e for e in batch[ERROR]], dtype=bool)
        n = len(ok)
        index = np.zeros((n, self.k), dtype=np.int64)
        prob = np.zeros((n, self.k), dtype=np.float32)
        if ok.any():
            index[ok], prob[ok] = top_k(self.probs_of(torch.from_numpy(np.ascontiguousarray(batch[VIEW][ok]))), self.k)
        return {PATH: batch[PATH], ERROR: batch[ERROR], INDEX: index, PROB: prob}


def actor_resources(cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """(resources of one predicting actor, the most actors) for a cluster's total resources (module docstring)."""
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return {"num_gpus": 1.0}, gpus
    cpus = float(cluster.get("CPU", 1))
    return {"num_cpus": 0.5 if cpus < 4 else 1.0}, max(1, int(cpus // 4))


def predict_on_ray(trained, files: list[str], out, peer: str, batch_size: int, address: str) -> None:
    """Every file's row into ``out`` through Ray Data on the cluster at ``address`` (module docstring)."""
    from cmd_dist.launch.cluster import init_ray

    cfg = copy.deepcopy(trained.cfg)
    cfg.ray.address = None if address == "local" else address
    init_ray(cfg)  # joins (or, for "local", starts) Ray; returns at once when this process is already connected

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows in the files' order, as the local path writes them
    ctx.enable_progress_bars = sys.stderr.isatty()
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan and timing lines; errors still show
    shown = {os.path.abspath(f): f for f in files}
    resources, actors = actor_resources(ray.cluster_resources())
    ds = ray.data.read_binary_files(list(shown), include_paths=True)
    ds = ds.map_batches(
        decode_views, fn_kwargs={"spec": trained.spec, "streamed": _streamed(trained)}, batch_size=batch_size
    )
    ds = ds.map_batches(
        PeerPredictor,
        fn_constructor_kwargs={"trained": portable(trained), "peer": peer, "k": out.k},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        **resources,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = [shown.get(_local_path(p), p) for p in batch[PATH]]
        good = [i for i, e in enumerate(batch[ERROR]) if not e]
        for i, e in enumerate(batch[ERROR]):
            if e:
                out.skip(names[i], e)
        if good:
            out.write([names[i] for i in good], batch[INDEX][good], batch[PROB][good])


def _local_path(path: str) -> str:
    """Ray Data's path column for a local file, as the driver listed it (absolute)."""
    return os.path.abspath(path if path.startswith("/") else "/" + path)
