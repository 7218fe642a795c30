"""Config errors name the key and what is allowed; the CLI turns them (and bad data files) into one line on
stderr and exit code 2 before Ray starts. No test here starts Ray: the CLI subprocesses run with a fake ``ray``
package first on the path, so a run that got past the checks would crash with a traceback instead of training."""

from __future__ import annotations

import math
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmd_dist.config import ConfigError, dump_yaml, load_config, parse_overrides
from cmd_dist.data.prepare import check_data
from cmd_dist.data.resident import safe_unpickle
from cmd_dist.errors import DataError

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "demo.yaml"


def _error(overrides: list[str] | None = None, path: Path | str | None = DEMO) -> str:
    """The ConfigError message for loading ``path`` with ``overrides`` (which must fail), checked to be one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_in_file(tmp_path):
    msg = _error(path=_write(tmp_path, "epochs: 3\n"))
    assert "'epochs'" in msg and "allowed:" in msg and "train" in msg and "method" in msg


def test_unknown_nested_key_in_file(tmp_path):
    msg = _error(path=_write(tmp_path, "method:\n  etta: 3\n"))
    assert "'method.etta'" in msg and "method.eta" in msg and "method.b2" in msg


def test_unknown_peer_key_in_file(tmp_path):
    msg = _error(path=_write(tmp_path, "peers:\n  - {arch: resnet18, colour: red}\n  - {arch: resnet18}\n"))
    assert "peers[0].colour" in msg and "peers[0].arch" in msg


@pytest.mark.parametrize(
    "override,key",
    [
        ("foo=1", "'foo'"),
        ("method.foo=1", "'method.foo'"),
        ("data.foo.bar=1", "'data.foo'"),
        ("train.lr.x=1", "'train.lr'"),
    ],
)
def test_unknown_key_via_override(override, key):
    msg = _error([override])
    assert key in msg and "unknown config key" in msg


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override,key,expected",
    [
        ("train.epochs=abc", "train.epochs", "integer"),
        ("train.epochs=1.5", "train.epochs", "integer"),
        ("train.epochs=true", "train.epochs", "integer"),
        ("noise.rate=abc", "noise.rate", "number"),
        ("noise.rate=true", "noise.rate", "number"),
        ("method.eta=null", "method.eta", "number"),
        ("train.milestones=5", "train.milestones", "list"),
        ("train.milestones=[10, x]", "train.milestones[1]", "integer"),
        ("peers=resnet18", "peers", "list"),
        ("method=3", "method", "mapping"),
        ("data.augment=maybe", "data.augment", "true or false"),
        ("data.dataset=5", "data.dataset", "string"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override, key, expected):
    msg = _error([override])
    assert msg.startswith(key + ":") and expected in msg, msg


def test_wrong_type_in_file(tmp_path):
    msg = _error(path=_write(tmp_path, "train:\n  epochs: ten\n"))
    assert msg.startswith("train.epochs:") and "'ten'" in msg


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("2.5e+1", 25.0), (".5", 0.5), ("3", 3.0)])
def test_float_spellings_yaml_reads_as_strings_are_numbers(text, value):
    """PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; a float key must still accept it."""
    assert load_config(DEMO, [f"train.lr={text}"]).train.lr == pytest.approx(value)


def test_float_exponent_in_file(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  weight_decay: 5e-4\n  lr: 1e-1\n"))
    assert cfg.train.weight_decay == pytest.approx(5e-4) and cfg.train.lr == pytest.approx(0.1)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("eta", ["0", "0.0", ".nan"])
def test_eta_zero_or_nan_is_rejected(eta):
    msg = _error([f"method.eta={eta}"])
    assert msg.startswith("method.eta:") and "eta=inf" in msg


@pytest.mark.parametrize("rate", ["1.0", "1", "-0.1", "1.5"])
def test_noise_rate_outside_unit_interval(rate):
    msg = _error([f"noise.rate={rate}"])
    assert msg.startswith("noise.rate:") and "[0, 1)" in msg


def test_noise_rate_zero_is_clean_labels():
    assert load_config(DEMO, ["noise.rate=0"]).noise.rate == 0.0


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("peers.1.arch=vgg16", "peers[1].arch", "resnet34"),
        ("method.self_kd=dino", "method.self_kd", "mconf"),
        ("method.knowledge=some", "method.knowledge", "cmd-p"),
        ("method.objective=dml", "method.objective", "syncmkd"),
        ("noise.kind=asym", "noise.kind", "pairflip"),
        ("data.dataset=imagenet", "data.dataset", "cifar100"),
        ("data.protocol=test", "data.protocol", "search"),
    ],
)
def test_unknown_choice_lists_what_is_allowed(override, key, allowed):
    msg = _error([override])
    assert msg.startswith(key + ":") and allowed in msg and "not one of" in msg


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_must_be_positive(epochs):
    msg = _error([f"train.epochs={epochs}"])
    assert msg.startswith("train.epochs:") and "> 0" in msg


def test_batch_size_must_be_positive():
    assert _error(["train.batch_size=0"]).startswith("train.batch_size:")


def test_milestones_must_increase():
    assert _error(["train.milestones=[80, 50]"]).startswith("train.milestones:")


def test_cmd_s_needs_b2_zero():
    msg = _error(["method.knowledge=cmd-s", "method.b2=-4"])
    assert msg.startswith("method.b2:") and "cmd-s" in msg
    assert load_config(DEMO, ["method.knowledge=cmd-s", "method.b2=0"]).method.knowledge == "cmd-s"


def test_cmd_p_needs_b2_nonzero():
    msg = _error(["method.knowledge=cmd-p", "method.b2=0"])
    assert msg.startswith("method.b2:") and "cmd-s" in msg


@pytest.mark.parametrize("knowledge", ["zero", "all"])
def test_b2_is_free_for_zero_and_all(knowledge):
    for b2 in ("0", "-8", "5"):
        assert load_config(DEMO, [f"method.knowledge={knowledge}", f"method.b2={b2}"]).method.knowledge == knowledge


def test_mutual_distillation_needs_two_peers_but_self_kd_does_not():
    msg = _error(["peers=[{arch: resnet18}]"])
    assert msg.startswith("peers:") and "at least 2" in msg
    assert len(load_config(DEMO, ["peers=[{arch: resnet18}]", "method.knowledge=zero"]).peers) == 1
    assert len(load_config(DEMO, ["peers=[{arch: resnet18}]", "method.objective=tfkd_reg"]).peers) == 1


def test_peer_names_must_be_unique():
    msg = _error(["peers.1.name=peerA"])
    assert msg.startswith("peers:") and "unique" in msg


# ----------------------------------------------------------------------------- overrides


def test_override_without_equals():
    msg = _error(["method.eta"])
    assert "'method.eta'" in msg and "key=value" in msg


def test_override_values_are_yaml():
    pairs = dict(parse_overrides(["a=3", "b=0.5", "c=[1, 2]", "d={x: 1}", "e=true", "f=hello", "g="]))
    assert pairs == {"a": 3, "b": 0.5, "c": [1, 2], "d": {"x": 1}, "e": True, "f": "hello", "g": ""}


def test_override_peers_list_and_default_names():
    cfg = load_config(DEMO, ["peers=[{arch: resnet18}, {arch: shufflenetv2}]"])
    assert [(p.arch, p.name) for p in cfg.peers] == [("resnet18", "peer0"), ("shufflenetv2", "peer1")]


@pytest.mark.parametrize("text", ["inf", ".inf", "+inf", "Inf"])
def test_override_eta_inf_is_zero_knowledge_threshold(text):
    assert load_config(DEMO, [f"method.eta={text}"]).method.eta == math.inf


def test_override_negative_eta_is_allowed():
    """Sec. 4.2: eta in R^- (like +inf) gives zero knowledge; it is a legal value."""
    assert load_config(DEMO, ["method.eta=-inf"]).method.eta == -math.inf
    assert load_config(DEMO, ["method.eta=-2"]).method.eta == -2.0


def test_override_indexes_into_peers():
    cfg = load_config(DEMO, ["peers.1.arch=resnet18"])
    assert [(p.arch, p.name) for p in cfg.peers] == [("cnn_small", "peerA"), ("resnet18", "peerB")]


@pytest.mark.parametrize("override", ["peers.2.arch=resnet18", "peers.x.arch=resnet18", "peers.5=1"])
def test_override_bad_peer_index(override):
    msg = _error([override])
    assert "peers" in msg and override.split("=")[0] in msg


def test_override_whitespace_around_key_is_ignored():
    assert load_config(DEMO, [" method.eta =3"]).method.eta == 3.0


def test_precedence_defaults_file_overrides(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 7\nmethod:\n  eta: 3\n")
    cfg = load_config(path, ["method.eta=5"])
    assert cfg.train.epochs == 7  # file over default
    assert cfg.method.eta == 5.0  # override over file
    assert cfg.train.batch_size == 128 and cfg.method.b1 == 16.0  # defaults elsewhere


def test_defaults_give_two_named_peers():
    cfg = load_config()
    assert [p.name for p in cfg.peers] == ["peer0", "peer1"]
    assert cfg.method.knowledge == "cmd-p" and cfg.method.b2 != 0  # defaults validate


def test_explicit_peer_names_are_kept():
    assert [p.name for p in load_config(DEMO).peers] == ["peerA", "peerB"]


def test_resolved_config_round_trips_through_yaml(tmp_path):
    """Run folders store dump_yaml(cfg) and --resume loads it back: it must give the same config."""
    cfg = load_config(DEMO, ["method.eta=inf", "train.lr=1e-3", "method.epsilon=0.2", "peers.1.arch=resnet18"])
    again = load_config(_write(tmp_path, dump_yaml(cfg), "config.yaml"))
    assert again == cfg


# ----------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path):
    msg = _error(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_invalid_yaml_file(tmp_path):
    msg = _error(path=_write(tmp_path, "train: [1, 2\n"))
    assert "cfg.yaml" in msg and "not valid YAML" in msg


def test_non_mapping_yaml_file(tmp_path):
    msg = _error(path=_write(tmp_path, "- 1\n- 2\n"))
    assert "cfg.yaml" in msg and "mapping" in msg


def test_empty_yaml_file_is_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "# nothing\n")) == load_config()


# ----------------------------------------------------------------------------- data files (no Ray)


class _Hostile:
    """Unpickling this runs ``touch MARKER`` (with a plain pickle.load)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _cifar_root(tmp_path: Path, train_bytes: bytes) -> Path:
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(train_bytes)
    return folder.parent


def test_hostile_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    root = _cifar_root(tmp_path, pickle.dumps({"data": _Hostile(marker), "fine_labels": [0]}))
    with pytest.raises(DataError) as info:
        safe_unpickle(root / "cifar-100-python" / "train")
    assert str(root / "cifar-100-python" / "train") in str(info.value) and "refusing" in str(info.value)
    assert not marker.exists()


def test_truncated_pickle_is_a_one_line_error(tmp_path):
    good = {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]}
    root = _cifar_root(tmp_path, pickle.dumps(good)[:200])
    cfg = load_config(DEMO, ["data.dataset=cifar100", f"data.root={root}"])
    with pytest.raises(DataError) as info:
        check_data(cfg.data)
    msg = str(info.value)
    assert str(root / "cifar-100-python" / "train") in msg and "\n" not in msg


def test_well_formed_pickle_with_wrong_content(tmp_path):
    root = _cifar_root(tmp_path, pickle.dumps({"data": np.zeros((4, 10), np.uint8), "fine_labels": [0, 1, 2, 3]}))
    cfg = load_config(DEMO, ["data.dataset=cifar100", f"data.root={root}"])
    with pytest.raises(DataError, match="3072"):
        check_data(cfg.data)


# ----------------------------------------------------------------------------- the CLI (subprocess)


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "cmd-dist"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cmd_dist.cli"]


@pytest.fixture
def run_cli(tmp_path):
    """Run ``cmd-dist train ARGS`` from the repo root with Ray unimportable and no network; returns the result.

    Every call writes runs to tmp_path/runs, which must not exist afterwards: the error came before the run
    folder (and so before Ray).
    """
    fence = tmp_path / "fence" / "ray"
    fence.mkdir(parents=True)
    (fence / "__init__.py").write_text("raise ImportError('ray is fenced off in tests/unit/config/test_config.py')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k.lower() != "no_proxy"}
    env["PYTHONPATH"] = os.pathsep.join([str(fence.parent), str(REPO)])
    # A missing CIFAR folder makes cmd-dist try a torchvision download: make it fail fast, offline or not.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[var] = "http://127.0.0.1:9"
    out_dir = tmp_path / "runs"

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [*_cli(), "train", *args, f"output_dir={out_dir}"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert "Traceback" not in result.stderr, result.stderr
        assert "run folder" not in result.stdout, result.stdout
        assert not out_dir.exists(), "a run folder was created: the error came too late"
        return result

    return run


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cmd-dist: error: ")
    return lines[0]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["method.eta=0"], "method.eta"),
        (["train.epochs=abc"], "train.epochs"),
        (["train.batch_size=5000"], "train.batch_size"),  # digits has 1,438 training images: a data check
    ],
)
def test_cli_config_error_is_one_line_exit_2(run_cli, overrides, needle):
    line = _one_error_line(run_cli("configs/demo.yaml", *overrides))
    assert needle in line


@pytest.fixture
def main_without_ray(monkeypatch, tmp_path):
    """cmd_dist.cli.main in this process, with Ray and the launcher unimportable (a run that got through would
    fail instead of starting Ray); returns a function giving (exit code, stdout, stderr)."""
    import cmd_dist
    from cmd_dist import cli

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "cmd_dist.launch.job", None)
    monkeypatch.delattr(cmd_dist.launch, "job", raising=False)
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "runs"

    def run(capsys, *args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as info:
            cli.main(["train", *args, f"output_dir={out_dir}"])
        captured = capsys.readouterr()
        assert not out_dir.exists()
        return info.value.code, captured.out, captured.err

    return run


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.epochs=1.5"], "train.epochs"),
        (["noise.rate=1.0"], "noise.rate"),
        (["noise.rate=-0.1"], "noise.rate"),
        (["method.bogus=1"], "method.bogus"),
        (["bogus=1"], "bogus"),
        (["peers.1.arch=vgg16"], "peers[1].arch"),
        (["method.self_kd=dino"], "method.self_kd"),
        (["method.objective=dml"], "method.objective"),
        (["method.knowledge=some"], "method.knowledge"),
        (["train.epochs=0"], "train.epochs"),
        (["method.knowledge=cmd-s"], "method.b2"),  # demo.yaml has b2 = -8
        (["method.knowledge=cmd-p", "method.b2=0"], "method.b2"),
        (["method.eta"], "key=value"),
    ],
)
def test_cli_main_config_error_is_one_line_exit_2(main_without_ray, capsys, overrides, needle):
    code, out, err = main_without_ray(capsys, "configs/demo.yaml", *overrides)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cmd-dist: error: ") and needle in lines[0], err


def test_cli_missing_config_file(run_cli):
    line = _one_error_line(run_cli("configs/no_such.yaml"))
    assert "configs/no_such.yaml" in line


def test_cli_missing_cifar_root(run_cli, tmp_path):
    root = tmp_path / "nonexistent"
    line = _one_error_line(run_cli("configs/demo.yaml", "data.dataset=cifar100", f"data.root={root}"))
    assert str(root) in line and "cifar-100-python" in line and "data.root" in line
    assert not root.exists()  # a mistyped root is never created (no download attempt into it)


def test_cli_corrupted_cifar_pickle(run_cli, tmp_path):
    root = _cifar_root(tmp_path, b"\x00 this is not a pickle \xff" * 64)
    line = _one_error_line(run_cli("configs/demo.yaml", "data.dataset=cifar100", f"data.root={root}"))
    assert str(root / "cifar-100-python" / "train") in line


def test_cli_hostile_cifar_pickle_is_not_run(run_cli, tmp_path):
    marker = tmp_path / "PWNED"
    root = _cifar_root(tmp_path, pickle.dumps({"data": _Hostile(marker), "fine_labels": [0]}))
    assert not marker.exists()
    line = _one_error_line(run_cli("configs/demo.yaml", "data.dataset=cifar100", f"data.root={root}"))
    assert str(root / "cifar-100-python" / "train") in line
    assert not marker.exists(), "the hostile pickle's payload ran"


def test_cli_fence_really_blocks_ray(tmp_path):
    """The guard the CLI tests rely on: with the fence first on the path, importing ray fails."""
    fence = tmp_path / "ray"
    fence.mkdir()
    (fence / "__init__.py").write_text("raise ImportError('fenced')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "fenced" in result.stderr


def test_yaml_of_the_demo_is_a_mapping():
    """Sanity for the CLI tests: they rely on demo.yaml's values (two cnn_small peers, b2 = -8, digits)."""
    raw = yaml.safe_load(DEMO.read_text())
    assert raw["method"]["b2"] == -8.0 and raw["data"]["dataset"] == "digits" and len(raw["peers"]) == 2


# ----------------------------------------------------------------------------- every validated key (issue 11)


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("data.val_fraction=0", "data.val_fraction", "(0, 1)"),
        ("data.val_fraction=1.0", "data.val_fraction", "(0, 1)"),
        ("data.train_subset=-1", "data.train_subset", ">= 0"),
        ("data.test_subset=-5", "data.test_subset", ">= 0"),
        ("method.progress_unit=step", "method.progress_unit", "iteration"),
        ("method.epsilon=1.5", "method.epsilon", "[0, 1]"),
        ("method.epsilon=-0.1", "method.epsilon", "[0, 1]"),
        ("method.kd_weight=2", "method.kd_weight", "[0, 1]"),
        ("train.eval_batch_size=0", "train.eval_batch_size", "> 0"),
        ("train.lr=0", "train.lr", "> 0"),
        ("train.lr=-0.1", "train.lr", "> 0"),
        ("train.fast_path=sometimes", "train.fast_path", "auto"),
        ("train.compile_mode=fastest", "train.compile_mode", "reduce-overhead"),
        ("train.milestones=[0, 5]", "train.milestones", "increasing positive"),
        ("train.cuda_graph=maybe", "train.cuda_graph", "auto"),
        ("train.checkpoint_every=0", "train.checkpoint_every", ">= 1"),
        ("peers.0.arch=vgg16", "peers[0].arch", "resnet34"),
        ("peers=[]", "peers", "at least"),
        ("ray.placement=anywhere", "ray.placement", "together"),
        ("ray.use_gpu=maybe", "ray.use_gpu", "auto"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker", "> 0"),
        ("ray.gpus_per_worker=0", "ray.gpus_per_worker", "(0, 1]"),
        ("ray.gpus_per_worker=2", "ray.gpus_per_worker", "(0, 1]"),
        ("ray.max_failures=-1", "ray.max_failures", ">= 0"),
        ("ray.keep_checkpoints=0", "ray.keep_checkpoints", ">= 1"),
        ("ray.replicas_per_peer=0", "ray.replicas_per_peer", ">= 1"),
        ("ray.sync_batchnorm=sometimes", "ray.sync_batchnorm", "auto"),
        ("run_name=a/b", "run_name", "plain folder name"),
        ("run_name=..", "run_name", "plain folder name"),
    ],
)
def test_every_validated_key_names_itself_and_what_is_allowed(override, key, words):
    msg = _error([override])
    assert msg.startswith(f"{key}:"), msg
    assert words in msg, msg


@pytest.mark.parametrize(
    "override",
    [
        "data.val_fraction=0.5",
        "method.epsilon=0",
        "method.kd_weight=1",
        "ray.gpus_per_worker=0.25",
        "ray.replicas_per_peer=1",
        "ray.sync_batchnorm=true",
    ],
)
def test_validated_keys_accept_their_edge_values(override):
    load_config(DEMO, [override])


def test_cuda_graph_refuses_a_compile_mode_that_captures_its_own_graphs():
    msg = _error(["train.cuda_graph=true", "train.compile_mode=reduce-overhead"])
    assert msg.startswith("train.compile_mode:") and "compile_mode=none" in msg
    load_config(DEMO, ["train.cuda_graph=true", "train.compile_mode=max-autotune-no-cudagraphs"])


# ----------------------------------------------------------------------------- what --resume may change (issue 18.2)


def test_every_config_key_is_classified_for_resume():
    """Each top-level key is listed in RESUME_KEYS, and the classification says what the issue asks."""
    import dataclasses

    from cmd_dist.config import RESUME_KEYS, Config, resume_key_kind

    assert {f.name for f in dataclasses.fields(Config)} <= set(RESUME_KEYS)
    assert set(RESUME_KEYS.values()) == {"training", "free", "fixed"}
    for key in ("train.lr", "train.epochs", "method.eta", "data.dataset", "noise.rate", "seed", "peers.1.arch"):
        assert resume_key_kind(key) == "training", key
    for key in ("ray.keep_checkpoints", "ray.cpus_per_worker", "ray.placement", "train.log_every", "paper.value"):
        assert resume_key_kind(key) == "free", key
    assert resume_key_kind("ray.replicas_per_peer") == "training"
    assert resume_key_kind("run_name") == resume_key_kind("output_dir") == "fixed"


def _run_folder(tmp_path: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(DEMO, ["train.epochs=10", *overrides])
    cfg.output_dir, cfg.run_name = str(tmp_path), "run"
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return run_dir


def _resume_error(capsys, run_dir: Path, overrides: list[str], allow: bool = False) -> str:
    from cmd_dist.cli import _resume_config

    with pytest.raises(SystemExit) as e:
        _resume_config(str(run_dir), overrides, allow)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cmd-dist: error: "), err
    return err


def test_resume_refuses_a_training_change_and_touches_nothing(tmp_path, capsys, monkeypatch):
    import cmd_dist.runs.run_folder

    monkeypatch.setattr(cmd_dist.runs.run_folder, "newest_checkpoint_epoch", lambda *a: 10)
    run_dir = _run_folder(tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in run_dir.iterdir())
    err = _resume_error(capsys, run_dir, ["train.lr=0.5", "ray.keep_checkpoints=3"])
    assert "train.lr: 0.05 -> 0.5 changes what" in err and "--allow-changes" in err and "new run" in err
    err = _resume_error(capsys, run_dir, ["method.eta=2", "train.lr=0.5"])
    assert err.startswith("cmd-dist: error: method.eta: 4.0 -> 2.0 (and 1 more)"), err
    # a finished run: even allowed, a change that would train nothing, or fewer epochs than trained, is refused
    err = _resume_error(capsys, run_dir, ["train.lr=0.5"], allow=True)
    assert "train.lr:" in err and "trained all its 10 epochs" in err and "train.epochs=N" in err
    err = _resume_error(capsys, run_dir, ["train.epochs=2"], allow=True)
    assert "train.epochs: 2 is fewer than the 10 epochs" in err
    err = _resume_error(capsys, run_dir, ["run_name=other"])
    assert "run_name: --resume continues the run" in err
    assert sorted((p.name, p.read_bytes()) for p in run_dir.iterdir()) == before


def test_resume_allows_keys_that_change_nothing_trained(tmp_path, monkeypatch):
    import cmd_dist.runs.run_folder
    from cmd_dist.cli import _resume_config

    monkeypatch.setattr(cmd_dist.runs.run_folder, "newest_checkpoint_epoch", lambda *a: 4)
    run_dir = _run_folder(tmp_path)
    r = _resume_config(str(run_dir), ["ray.keep_checkpoints=5", "train.log_every=7", "data.workers=2"])
    assert r.changes == {} and r.writes and r.cfg.ray.keep_checkpoints == 5
    r = _resume_config(str(run_dir), [])
    assert r.changes == {} and not r.writes
    r = _resume_config(str(run_dir), ["train.epochs=20", "train.lr=0.2"], True)
    assert r.changes == {"train.epochs": (10, 20), "train.lr": (0.05, 0.2)} and r.done == 4


def test_an_allowed_change_is_recorded_with_its_epoch(tmp_path, monkeypatch):
    """config.yaml takes the new values, config.original.yaml keeps the first, changes.jsonl and summary.json say
    what changed from which epoch (and that Eq. 12's schedule moved with train.epochs)."""
    import json

    import cmd_dist.runs.run_folder
    from cmd_dist.cli import _resume_config
    from cmd_dist.launch.summary import read_changes, record_resume

    monkeypatch.setattr(cmd_dist.runs.run_folder, "newest_checkpoint_epoch", lambda *a: 10)
    run_dir = _run_folder(tmp_path)
    first = (run_dir / "config.yaml").read_text()
    (run_dir / "summary.json").write_text(json.dumps({"epochs_run": 10, "epochs": 10}))
    r = _resume_config(str(run_dir), ["train.epochs=15"], True)
    record_resume(r.run_dir, r.text, r.cfg, r.changes, r.done + 1)
    assert load_config(run_dir / "config.yaml").train.epochs == 15
    assert (run_dir / "config.original.yaml").read_text() == first
    (entry,) = [json.loads(line) for line in (run_dir / "changes.jsonl").read_text().splitlines()]
    assert entry["from_epoch"] == 11 and entry["changes"] == {"train.epochs": {"old": 10, "new": 15}}
    assert "chi" in entry["note"] and "changed at epoch 11" in entry["note"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 15 and summary["changes"] == [entry]
    # a second change: appended; the original config stays the first one
    monkeypatch.setattr(cmd_dist.runs.run_folder, "newest_checkpoint_epoch", lambda *a: 12)
    r = _resume_config(str(run_dir), ["train.lr=0.01"], True)
    record_resume(r.run_dir, r.text, r.cfg, r.changes, r.done + 1)
    rows = [json.loads(line) for line in (run_dir / "changes.jsonl").read_text().splitlines()]
    assert [row["from_epoch"] for row in rows] == [11, 13] and "note" not in rows[1]
    assert (run_dir / "config.original.yaml").read_text() == first
    assert load_config(run_dir / "config.yaml").train.lr == 0.01
    assert read_changes(run_dir) == rows


def test_allow_changes_without_resume_is_one_line(capsys):
    from cmd_dist.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", str(DEMO), "--allow-changes"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "cmd-dist: error: --allow-changes applies to --resume RUN_DIR (a new run has nothing to change)\n"
    )


# ----------------------------------------------------------------------------- typed config (issue 19 §6)

TRI_STATE_KEYS = ("train.fast_path", "train.cuda_graph", "ray.use_gpu", "ray.sync_batchnorm")


@pytest.mark.parametrize("key", TRI_STATE_KEYS)
@pytest.mark.parametrize(
    "spelling, value",
    [
        ("true", "true"),
        ('"true"', "true"),
        ('"True"', "true"),
        ("false", "false"),
        ("no", "false"),
        ('"FALSE"', "false"),
    ],
)
def test_a_tri_state_reads_yaml_booleans_and_strings_as_the_same_value(tmp_path, key, spelling, value):
    """``cuda_graph: true`` (a YAML boolean) and ``cuda_graph: "true"`` mean the same: the string ``"true"``, in a
    file and in an override; the resolved config.yaml writes that string back."""
    section, name = key.split(".")
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n  {name}: {spelling}\n")
    extra = ["ray.use_gpu=auto"] if key == "ray.sync_batchnorm" else []
    for cfg in (load_config(path, extra), load_config(None, [f"{key}={spelling}", *extra])):
        assert getattr(getattr(cfg, section), name) == value
        assert yaml.safe_load(dump_yaml(cfg))[section][name] == value


def test_tri_states_and_fixed_choices_are_literals_of_the_schema():
    """The allowed values are written once, in the section's dataclass; the loader checks them from there."""
    import typing

    from cmd_dist.config import TRI_STATE, Config

    sections = typing.get_type_hints(Config)
    hints = {name: typing.get_type_hints(sections[name]) for name in ("data", "train", "ray")}
    for key in TRI_STATE_KEYS:
        section, name = key.split(".")
        assert typing.get_args(hints[section][name]) == TRI_STATE == ("auto", "true", "false"), key
    for key in ("data.dataset", "data.protocol", "data.decode", "train.compile_mode", "ray.placement"):
        section, name = key.split(".")
        assert typing.get_origin(hints[section][name]) is typing.Literal, key


def test_one_list_of_dataset_names_in_the_data_layer():
    """data.dataset accepts exactly the data layer's DATASETS: the resident ones (SPECS) and the streamed ones."""
    from cmd_dist.data.types import DATASETS, REAL_NOISE_DATASETS, SPECS, STREAMED

    assert set(DATASETS) == set(SPECS) | set(STREAMED) and not set(SPECS) & set(STREAMED)
    assert set(REAL_NOISE_DATASETS) <= set(STREAMED)
    msg = _error(["data.dataset=svhn"])
    assert msg == f"data.dataset: 'svhn' is not one of {', '.join(DATASETS)}"
