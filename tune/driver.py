"""The Ray Tune side of ``cmd-dist tune``: each trial hosts one Ray Train job, the same one ``cmd-dist train`` runs.

Ray Train V2 trainers cannot be handed to ``Tuner``; a trial (:class:`CMDTrial`) builds the TorchTrainer
with ``cmd_dist.launch.job.build_trainer`` and fits it in a thread, and a Train callback forwards each
epoch's report to the trial, so Tune (and ASHA) sees every epoch. The trial process asks Ray for no
CPU: its Train workers hold the CPUs and GPUs, and :func:`tune.resources.plan_resources` caps how many
trials run at once (on a 2-CPU machine a trial that also held a CPU would wait forever for its workers).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cmd_dist.config import Config, ConfigError, from_dict
from cmd_dist.launch import environment  # noqa: F401 - Ray's environment defaults, before Ray is imported
from cmd_dist.launch.cluster import alive_nodes, cluster_nodes, init_ray
from cmd_dist.launch.console import CONSOLE, set_console
from cmd_dist.launch.job import fit_with_restarts, resolve_run_dir, run_interruptibly, train
from cmd_dist.launch.placement import plan_placement, scaling_for
from cmd_dist.launch.shared_output import check_shared_output
from cmd_dist.runs.fs import arrow_storage, join, open_folder
from cmd_dist.runs.run_folder import read_run_file
from cmd_dist.runs.storage import remove_dead_staging
from tune.job import TUNE_EXPERIMENT, SearchJob
from tune.lines import TrialLines
from tune.resources import plan_resources
from tune.results import TrialRow, make_row
from tune.space import Param, plain_value, trial_config

# isort: split
import ray
from ray import tune as ray_tune
from ray.train import UserCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.queue import Empty, Queue

#: Seconds a stopped trial's Ray Train run gets to finish (last epoch) or to abort (stopped early).
ABORT_GRACE_S = 60.0


def trial_dirname(trial: Any) -> str:
    """Short, stable trial folder names (Tune's default spells out every parameter)."""
    return f"trial_{trial.trial_id}"


class _ForwardReports(UserCallback):
    """Runs in the Ray Train controller: hands each epoch's metrics (rank 0's) to the trial's queue.

    The first report also carries the controller's handle, so the trial can stop the run (:func:`stop_train_run`).
    """

    def __init__(self, reports: Queue) -> None:
        self._reports = reports
        self._sent_handle = False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        item: dict[str, Any] = {"metrics": dict(metrics[0])}
        if not self._sent_handle:
            item["controller"] = ray.get_runtime_context().current_actor
            self._sent_handle = True
        self._reports.put(item)


class CMDTrial(ray_tune.Trainable):
    """One trial: the sampled values on the user's config, search protocol, a full multi-peer CMD fit.

    A class, not a function trainable, for its ``cleanup``: when Tune stops a trial (ASHA, or the last
    epoch) it kills the trial's process, and a Ray Train run killed with it keeps its workers'
    placement group (Train frees it through the state API, absent without the dashboard): the CPUs
    stay reserved and every later trial waits for them forever. ``cleanup`` first lets a finishing
    run end, or stops a running one (:func:`stop_train_run`), so its workers and resources are released.
    Each trial's Train run has its own placement group, so on a cluster trials run side by side on any nodes.

    The trial's cmd-dist run folder is its Tune trial folder: tb/, metrics.jsonl and config.yaml sit
    beside Tune's result.json and event files, and a resumed trial finds its own checkpoints there. Behind a
    URI the trial is a URI run (its workers stage and upload, see :mod:`cmd_dist.runs.storage`) and Tune uploads its
    own files beside them; the search's lock covers the trial's folder, so the trial takes no lock of its own.
    """

    def setup(self, config: dict[str, Any], base: dict[str, Any], experiment_dir: str, verbose: bool = False) -> None:
        set_console(verbose=verbose, progress=False)
        cfg = trial_config(base, config)
        cfg.output_dir, cfg.run_name = experiment_dir, f"trial_{self.trial_id}"
        self._epochs = cfg.train.epochs
        self._reports = Queue(actor_options={"num_cpus": 0})
        self._controller: Any = None
        self._error: BaseException | None = None
        self._last: dict[str, Any] = {}
        self._done = threading.Event()
        run_dir = resolve_run_dir(cfg, lock=open_folder(experiment_dir).local is not None)
        self._hparams = trial_hparams(cfg, config)
        self._thread = threading.Thread(target=self._fit, args=(cfg, run_dir), name="cmd-fit", daemon=True)
        self._thread.start()

    def _fit(self, cfg: Config, run_dir: Path | str) -> None:
        try:
            # The same failure handling as `cmd-dist train`: a lost worker restarts the trial's peer
            # group from its newest checkpoint; an error of the training code fails the trial at once.
            fit_with_restarts(
                cfg,
                run_dir,
                callbacks=[_ForwardReports(self._reports)],
                echo=False,  # the search prints one line per finished trial, not every trial's epochs
                hparams=self._hparams,
            )
        except BaseException as e:  # noqa: BLE001 - handed to step(), which fails the trial with it
            self._error = e
        finally:
            self._done.set()

    def step(self) -> dict[str, Any]:
        """The next epoch's metrics; ``done`` on the last epoch (or a non-finite loss, which ends the run)."""
        while True:
            finished = self._done.is_set()  # read before the queue: a report put before the end is not missed
            item = self._next_report(timeout=1.0)
            if item is None:
                if not finished:
                    continue
                if self._error is not None:
                    raise self._error
                # The run ended without a further report (e.g. resumed after its last epoch).
                return {**self._last, "done": True}
            self._controller = item.get("controller", self._controller)
            metrics = item["metrics"]
            self._last = metrics
            done = bool(metrics.get("nonfinite")) or int(metrics.get("epoch", 0)) >= self._epochs
            return {**metrics, "done": done} if done else metrics

    def _next_report(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self._reports.get(timeout=timeout)
        except Empty:
            return None

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        """Nothing for Tune to keep: the Train run checkpoints every epoch in the trial folder, and a
        restored trial's run resumes from there."""
        return None

    def load_checkpoint(self, checkpoint: Any) -> None:
        return None

    def cleanup(self) -> None:
        # A run past its last report needs only a moment to close; otherwise it was stopped early: end it now.
        last_epoch = int(self._last.get("epoch", 0)) >= self._epochs or bool(self._last.get("nonfinite"))
        self._thread.join(timeout=ABORT_GRACE_S if last_epoch else 0.1)
        if self._thread.is_alive() and self._controller is not None:
            stop_train_run(self._controller)
            self._thread.join(timeout=ABORT_GRACE_S)


def stop_train_run(controller: Any) -> None:
    """End a Ray Train run at once and free its resources: the controller's ``abort()`` (Ray 2.60, pinned).

    Ray Train V2 has no public way to stop a running ``fit()``. ``ray.kill`` of the controller (public) is not
    enough: its workers die, but the run's placement group stays reserved (tested: the next trial then waits
    forever), while ``abort()`` shuts the worker group down and removes the placement group. ``abort()`` is
    internal (``ray.train.v2._internal...TrainController.abort``), so ``pyproject.toml`` pins Ray to 2.60.0 and
    tests/integration/test_tune.py and
    tests/integration/test_cluster.py::test_tune_runs_trials_concurrently_across_nodes fail if it
    stops freeing the resources (the later trials could not start). See docs/cluster.md.
    """
    if not hasattr(controller, "abort"):
        raise RuntimeError("Ray Train's controller has no abort() in this Ray version; cmd-dist pins ray==2.60.0")
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_GRACE_S)
    except Exception:  # noqa: BLE001 - the controller exits inside abort(); that is success
        pass


def trial_hparams(cfg: Config, sampled: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard HParams of a trial: b1, b2, eta (always; the paper's searched values) and every searched key."""
    values: dict[str, Any] = {"method.b1": cfg.method.b1, "method.b2": cfg.method.b2, "method.eta": cfg.method.eta}
    values.update({k: plain_value(v) for k, v in sampled.items()})
    return values


def tune_domain(param: Param) -> Any:
    if param.distribution == "uniform":
        return ray_tune.uniform(param.low, param.high)
    if param.distribution == "loguniform":
        return ray_tune.loguniform(param.low, param.high)
    if param.distribution == "randint":
        return ray_tune.randint(param.low, param.high + 1)  # Tune leaves high out; the space includes it
    return ray_tune.choice(list(param.values))


def search_setup(job: SearchJob, seed: int, max_concurrent: int = 0) -> tuple[dict[str, Any], Any, int]:
    """(param_space, search algorithm, num_samples) for --algo optuna / random / grid.

    ``max_concurrent`` must reach the random search's generator itself: Tune ignores
    ``TuneConfig(max_concurrent_trials=...)`` when handed a generator (it only wraps a ``Searcher``).
    """
    algo = job.options.algo
    start = [dict(p) for p in job.space.start] or None
    if algo == "grid":
        return {p.key: ray_tune.grid_search(p.grid_values()) for p in job.space.params}, None, 1
    space = {p.key: tune_domain(p) for p in job.space.params}
    if algo == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        if not CONSOLE.verbose:  # "A new study created in memory ..." and Optuna's other INFO lines
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Optuna's TPE, seeded; the space's start points are enqueued before TPE samples.
        return space, OptunaSearch(points_to_evaluate=start, seed=seed), job.options.trials
    generator = BasicVariantGenerator(points_to_evaluate=start, random_state=seed, max_concurrent=max_concurrent)
    return space, generator, job.options.trials


def max_epochs(job: SearchJob) -> int:
    """ASHA's max_t: the config's epochs, or the most a searched train.epochs allows."""
    epochs = from_dict(job.base).train.epochs
    for p in job.space.params:
        if p.key == "train.epochs":
            epochs = max([epochs, *(p.values or ()), *([p.high] if p.high is not None else [])])
    return int(epochs)


@dataclass
class SearchOutcome:
    rows: list[TrialRow]
    #: The config trials were built on (resource shares adjusted to this cluster); the final retrain uses it.
    trial_base: dict[str, Any]
    wall_s: float
    #: Trials that did not finish (interrupted search): the caller reports and offers --resume.
    unfinished: bool = False


def run_search(job: SearchJob, verbose: bool = False) -> SearchOutcome:
    """Start or join Ray, size the trials to the cluster, run (or restore and continue) the Tune experiment."""
    cfg = from_dict(job.base)
    plan, trial_base = _size_trials(job, cfg)
    # Tune's experiment (its state, each trial's result.json and events) in the search folder: a local folder,
    # or the URI's filesystem (pyarrow), where Tune uploads what it stages in the Ray session folder.
    storage_fs, storage_path = arrow_storage(job.search_dir)
    experiment_path = str(PurePosixPath(storage_path, TUNE_EXPERIMENT))
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(CMDTrial, base=trial_base, experiment_dir=str(job.experiment_dir), verbose=verbose),
        {"CPU": 0, "memory": 1},
    )
    param_space, searcher, num_samples = search_setup(job, cfg.seed, plan.concurrency)
    epochs = max_epochs(job)
    # Ray Tune's own trial tables (every few seconds, every column) with --verbose; otherwise one line per trial.
    callbacks = [] if verbose else [TrialLines(job, epochs, live=CONSOLE.progress)]
    if not verbose:
        # Ray Tune's newer console output prints its boxed settings and paths even at verbose=0.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    start = time.time()
    if job.resume and ray_tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs):
        print(f"cmd-dist: continuing the search in {job.experiment_dir}", flush=True)
        tuner = ray_tune.Tuner.restore(
            experiment_path,
            trainable=trainable,
            param_space=param_space,
            resume_unfinished=True,
            storage_filesystem=storage_fs,
        )
        # A restored Tuner keeps its saved RunConfig; the console settings are this session's.
        local = getattr(tuner, "_local_tuner", None)  # Ray 2.60's Tuner; other versions keep their saved console
        if local is not None:
            restored = local.get_run_config()
            restored.callbacks, restored.verbose = callbacks or None, 1 if verbose else 0
    else:
        tune_config = ray_tune.TuneConfig(
            metric=job.score_key,
            mode="max",
            search_alg=searcher,
            scheduler=_asha(job, epochs),
            num_samples=num_samples,
            max_concurrent_trials=plan.concurrency,
            trial_dirname_creator=trial_dirname,
        )
        run_config = ray_tune.RunConfig(
            name=TUNE_EXPERIMENT,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # Worker failures are retried inside a trial (ray.max_failures); a failed trial stays failed.
            failure_config=ray_tune.FailureConfig(max_failures=0),
            checkpoint_config=ray_tune.CheckpointConfig(checkpoint_at_end=False),
            callbacks=callbacks or None,
            verbose=1 if verbose else 0,
        )
        tuner = ray_tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    # In a helper thread: Tune's own SIGINT handler (a slow "graceful" stop) stays out of the way, and
    # Ctrl-C / SIGTERM reach the caller at once (it stops Ray and prints the --resume command).
    grid = run_interruptibly(tuner.fit)
    if job.is_uri:  # (not after Ctrl-C: the resumed search, or the trial's next run on that node, sweeps)
        sweep_staging(job)
    wall = time.time() - start
    rows = [_row(result, job, trial_base) for result in grid]
    finished = grid.num_terminated + grid.num_errors
    return SearchOutcome(rows, trial_base, wall, unfinished=finished < len(grid) or len(grid) < job.options.trials)


def _size_trials(job: SearchJob, cfg: Config) -> tuple[Any, dict[str, Any]]:
    """Start or join Ray and check a trial's placement against the cluster; (the resource plan, the config the
    trials are built on: their CPU share sized to this cluster, no address)."""
    init_ray(cfg)
    probe = trial_config(job.base, {})
    scaling, _, _ = scaling_for(probe)
    # The CPU/GPU and ray.spread node checks with the cluster's real totals (one line, before any trial starts).
    plan_placement(probe, cluster_nodes())
    # Every trial's workers write into the search folder: on a multi-node cluster every node must see it.
    check_shared_output(str(job.search_dir))
    plan = plan_resources(
        scaling.num_workers,
        dict(scaling.resources_per_worker or {"CPU": 1.0}),
        ray.cluster_resources(),
        job.options.max_concurrent,
        job.options.trials,
    )
    for note in plan.notes:
        print(f"cmd-dist: {note}", flush=True)
    trial_base = copy.deepcopy(job.base)
    trial_base["ray"]["cpus_per_worker"] = plan.resources_per_worker.get("CPU", cfg.ray.cpus_per_worker)
    # Trials run inside the cluster already; without the address their run folders' config.yaml stays the
    # same when a search is resumed with another --address (a changed config would refuse to resume).
    trial_base["ray"]["address"] = None
    print(
        f"cmd-dist: {plan.concurrency} trial(s) at once, each {scaling.num_workers} worker(s) x "
        f"{plan.resources_per_worker}",
        flush=True,
    )
    return plan, trial_base


def _asha(job: SearchJob, epochs: int) -> ASHAScheduler | None:
    """ASHA (trials stopped early on their score at an epoch) when the search asks for it."""
    if not job.options.asha:
        return None
    return ASHAScheduler(
        time_attr="epoch",
        max_t=epochs,
        grace_period=job.options.grace_period,
        reduction_factor=job.options.reduction_factor,
    )


def sweep_staging(job: SearchJob, timeout: float = 30.0) -> int:
    """Remove the staging folders the search's trials left on every node. A worker removes its own when it ends
    (also when ASHA's abort ends its run), but a killed one (a crash, a lost worker the trial restarted
    elsewhere) cannot, and a finished trial never runs again on that node to clean up after it. One zero-CPU
    task per alive node removes the folders of the trials' runs whose process is gone; returns how many (best
    effort: a node that does not answer within ``timeout`` keeps them)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        trials = [str(join(job.experiment_dir, d)) for d in _trial_dirnames(job)]
    except OSError:
        return 0
    if not trials:
        return 0

    @ray.remote(num_cpus=0, max_retries=0)
    def sweep(uris: list[str]) -> int:
        return sum(remove_dead_staging(u) for u in uris)

    refs = [
        sweep.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(trials)
        for n in alive_nodes()
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    removed = 0
    for ref in ready:
        try:
            removed += int(ray.get(ref, timeout=1))
        except Exception:  # noqa: BLE001 - best effort: a node that fails keeps its folders
            continue
    return removed


def _trial_dirnames(job: SearchJob) -> list[str]:
    """The trials' folder names in the experiment (``trial_<id>``), from the URI's listing."""
    return [d for d in open_folder(job.experiment_dir).dirs() if d.startswith("trial_")]


def _row(result: Any, job: SearchJob, trial_base: dict[str, Any]) -> TrialRow:
    metrics = dict(result.metrics or {})
    # result.path is a path inside the storage filesystem (no scheme for a URI): the trial's folder as the
    # user reaches it is the experiment's, joined with the trial's folder name.
    trial_dir = join(job.experiment_dir, PurePosixPath(result.path).name)
    trial_id = metrics.get("trial_id") or PurePosixPath(result.path).name.removeprefix("trial_")
    config = result.config or {}  # None for a trial that never started (e.g. an interrupted search)
    params = {k: plain_value(config.get(k)) for k in job.space.keys}
    try:
        epochs = trial_config(trial_base, params).train.epochs
    except ConfigError:
        epochs = from_dict(trial_base).train.epochs
    error = _one_line(result.error) if result.error is not None else ""
    return make_row(trial_id, params, metrics, job.peers, job.score_key, epochs, error, str(trial_dir))


def _one_line(error: BaseException) -> str:
    """The root cause's message: Tune wraps a trial's exception in its own, with a traceback."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def final_retrain(cfg: Config, run_dir: Path | str, verbose: bool = False) -> dict[str, Any]:
    """The best config with the final protocol (all training data, test): ``cmd-dist train``'s own code path.

    A retrain that already finished (a resumed search) is not repeated; an interrupted one continues.
    ``run_dir`` is a folder or a URI.
    """
    done = read_run_file(run_dir, "summary.json")
    if done is not None:
        try:
            summary = json.loads(done)
        except ValueError:
            summary = {}
        if summary.get("epochs_run") == cfg.train.epochs and summary.get("eval_split") == "test":
            print(f"cmd-dist: final retrain already done: {join(run_dir, 'summary.json')}", flush=True)
            return summary
    print(f"\ncmd-dist: retraining the best config on all training data, testing: {run_dir}", flush=True)
    run_dir = resolve_run_dir(cfg)
    return train(cfg, run_dir, verbose=verbose)
