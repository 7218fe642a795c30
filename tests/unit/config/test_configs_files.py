"""Every shipped experiment config loads and validates, says which paper table it reproduces with the paper's
number, and every command documented in configs/**/README.md parses and validates. No training, no Ray."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cmd_dist.config import ConfigError, load_config
from cmd_dist.launch.preflight import preflight

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs"
PAPER = REPO.parent / "shared" / "paper" / "not-all-knowledge-is-created-equal.md"
SHARED_CIFAR = REPO.parent / "shared" / "data"
NOT_PAPER = {"demo.yaml", "cifar100_smoke.yaml"}  # not paper results: no table claim needed
#: Folders whose reference numbers come from another paper (CIFAR-N: Wei et al. 2022), each cited with its source.
EXTERNAL = {"cifarn"}

YAMLS = sorted(CONFIGS.rglob("*.yaml"))
READMES = sorted(CONFIGS.rglob("README.md"))
# A paper accuracy as the configs and READMEs write it: two decimals and a percent sign.
PAPER_NUMBER = re.compile(r"\b(\d{2}\.\d{2})%")
COMMAND = re.compile(r"`(cmd-dist train configs/[^`]+)`")
SAME_AS = re.compile(r"same run as `(configs/[^`]+\.yaml)`")


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _header(path: Path) -> str:
    """The leading comment block of a YAML file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _paper_numbers() -> set[str]:
    if not PAPER.is_file():
        pytest.skip(f"paper text not found at {PAPER}")
    return set(re.findall(r"\b\d{2}\.\d{2}\b", PAPER.read_text()))


def _commands() -> list[tuple[str, str, str]]:
    """(README, line, command) for every `cmd-dist train configs/...` documented in configs/**/README.md."""
    out = []
    for readme in READMES:
        for line in readme.read_text().splitlines():
            for cmd in COMMAND.findall(line):
                out.append((_rel(readme), line, cmd))
    return out


def _load_command(cmd: str):
    argv = shlex.split(cmd)
    assert argv[:2] == ["cmd-dist", "train"], cmd
    config, overrides = argv[2], argv[3:]
    assert (REPO / config).is_file(), f"{cmd}: {config} does not exist"
    return load_config(REPO / config, overrides)


def _comparable(cfg) -> dict:
    d = cfg.to_dict()
    d.pop("output_dir")  # tables write to their own runs/tableN folder
    d.pop("paper")  # which table cites the run, not the run itself
    return d


def test_there_are_configs_and_readmes():
    names = {_rel(p) for p in YAMLS}
    assert {"configs/demo.yaml", "configs/cifar100_smoke.yaml", "configs/table1/base.yaml"} <= names
    for table in ("table1", "table3", "table5", "table6", "table7"):
        assert (CONFIGS / table / "README.md").is_file(), table
    assert len(_commands()) >= 20 + 20 + 8 + 8 + 16


@pytest.mark.parametrize("path", YAMLS, ids=_rel)
def test_config_file_loads(path):
    cfg = load_config(path)
    assert cfg.data.dataset in ("cifar100", "cifar10", "digits", "webvision", "food101n", "imagefolder")
    assert len(cfg.peers) >= 1


@pytest.mark.parametrize("path", YAMLS, ids=_rel)
def test_config_file_has_a_header(path):
    header = _header(path)
    assert header, f"{_rel(path)} has no leading comment saying what it reproduces"
    if path.name in NOT_PAPER and path.parent == CONFIGS:
        return
    if path.parent.name in EXTERNAL:  # no CMD number exists: the header cites the reference numbers' source
        assert "Wei et al." in header and "Table 2 of Morales-Brotons" in header and "CE " in header, _rel(path)
        return
    assert "Table" in header, f"{_rel(path)}: header names no paper table"
    numbers = PAPER_NUMBER.findall(header)
    assert numbers, f"{_rel(path)}: header gives no paper number (NN.NN%)"
    missing = set(numbers) - _paper_numbers()
    assert not missing, f"{_rel(path)}: header numbers {sorted(missing)} are not in the paper"
    # The machine-readable copy `cmd-dist report` draws: the table the header names, a number it states.
    paper = load_config(path).paper
    assert paper.table and paper.table in header, f"{_rel(path)}: paper.table {paper.table!r} not in its header"
    stated = [paper.value] if paper.value is not None else paper.peers
    assert stated and all(f"{v:.2f}" in numbers for v in stated), f"{_rel(path)}: paper {stated} vs header {numbers}"


@pytest.mark.parametrize("path", [p for p in YAMLS if p.parent not in (CONFIGS, CONFIGS / "table4")], ids=_rel)
def test_paper_configs_follow_appendix_a2(path):
    """SGD 0.9 / 5e-4 / batch 128 / lr 0.1 everywhere; ResNet-34 100 epochs, /10 at 50, 80; ResNet-18 and
    ShuffleNetV2 200 epochs, x0.2 at 60, 120, 160."""
    cfg = load_config(path)
    t = cfg.train
    assert (t.momentum, t.weight_decay, t.batch_size, t.lr) == (0.9, 5e-4, 128, 0.1)
    cifar = ("cifar100", "cifar10") if path.parent.name in EXTERNAL else ("cifar100",)
    assert cfg.data.dataset in cifar and cfg.data.protocol == "final"
    assert cfg.data.root == "../shared/data" and cfg.data.train_subset == 0 and cfg.data.test_subset == 0
    archs = {p.arch for p in cfg.peers}
    if archs == {"resnet34"}:
        assert (t.epochs, t.milestones, t.gamma) == (100, [50, 80], 0.1)
    else:
        assert archs == {"resnet18", "shufflenetv2"}
        assert (t.epochs, t.milestones, t.gamma) == (200, [60, 120, 160], 0.2)
    if cfg.method.knowledge == "cmd-p":
        assert cfg.method.b2 < 0  # the paper's default direction (Sec. 4.2, Fig. 4)


def test_table4_configs_follow_appendix_a2():
    """Food-101: ImageNet-initialised ResNet-50, batch 32, lr 0.01 /10 at 50 and 80, 100 epochs, Food-101's own
    training images; mini-WebVision: Inception-ResNet-v2, first 50 classes, 299 px, batch 32, lr 0.01, 80 epochs."""
    food = load_config(CONFIGS / "table4" / "food101_cmdp_mconf.yaml")
    web = load_config(CONFIGS / "table4" / "webvision_cmdp_mconf.yaml")
    for cfg in (food, web):
        t = cfg.train
        assert (t.momentum, t.weight_decay, t.batch_size, t.lr) == (0.9, 5e-4, 32, 0.01)
        assert cfg.noise.kind == "none" and cfg.data.protocol == "final" and cfg.method.knowledge == "cmd-p"
    assert (food.train.epochs, food.train.milestones) == (100, [50, 80])
    assert food.data.food_train == "food101" and food.data.image_size == 224
    assert [(p.arch, bool(p.weights)) for p in food.peers] == [("resnet50", True), ("resnet50", True)]
    assert web.train.epochs == 80 and web.data.num_classes == 50 and web.data.image_size == 299
    assert [p.arch for p in web.peers] == ["inception_resnet_v2"] * 2 and not any(p.weights for p in web.peers)


def test_smoke_config_is_a_small_real_cifar_slice():
    cfg = load_config(CONFIGS / "cifar100_smoke.yaml")
    assert cfg.data.dataset == "cifar100" and cfg.data.root == "../shared/data"
    assert (cfg.data.train_subset, cfg.data.test_subset) == (2000, 1000)
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 128
    assert [p.arch for p in cfg.peers] == ["cnn_small", "cnn_small"]


@pytest.mark.skipif(not (SHARED_CIFAR / "cifar-100-python").is_dir(), reason="shared CIFAR-100 copy not present")
def test_smoke_config_passes_the_data_preflight(monkeypatch):
    """The CLI's pre-Ray check reads the real pickles the smoke run needs (relative root, from the repo root)."""
    monkeypatch.chdir(REPO)
    cfg = load_config("configs/cifar100_smoke.yaml")
    preflight(cfg)  # raises DataError / ConfigError on a bad file or a batch larger than the slice
    with pytest.raises(ConfigError, match="train.batch_size"):
        preflight(load_config("configs/cifar100_smoke.yaml", ["train.batch_size=2001"]))


@pytest.mark.parametrize("readme,line,cmd", _commands(), ids=[c for _, _, c in _commands()])
def test_readme_command_validates(readme, line, cmd):
    cfg = _load_command(cmd)
    if readme == "configs/README.md" or Path(readme).parent.name in EXTERNAL:  # not CMD-paper table cells
        return
    numbers = PAPER_NUMBER.findall(line)
    assert numbers, f"README row gives no paper number: {line}"
    missing = set(numbers) - _paper_numbers()
    assert not missing, f"README numbers {sorted(missing)} are not in the paper: {line}"
    for same in SAME_AS.findall(line):
        assert _comparable(load_config(REPO / same)) == _comparable(cfg), f"{cmd} is not the same run as {same}"
    # The command carries the row's paper number(s), so `cmd-dist report` compares the run with its own cell.
    row = [float(n) for n in PAPER_NUMBER.findall(line.split("`cmd-dist")[0])]
    stated = [cfg.paper.value] if cfg.paper.value is not None else cfg.paper.peers
    assert stated == row, f"{cmd}: paper {stated}, but the row says {row}"


@pytest.mark.parametrize("table", ["table1", "table3", "table4", "table5", "table6", "table7", "cifarn"])
def test_readme_lists_each_config_of_its_table(table):
    commands = " ".join(cmd for _, _, cmd in _commands())
    for path in sorted((CONFIGS / table).glob("*.yaml")):
        assert _rel(path) in commands or _rel(path) in (CONFIGS / table / "README.md").read_text(), _rel(path)


def test_table1_readme_covers_the_whole_grid():
    """20 distinct runs: 5 self-KD methods x 4 knowledge modes, each with its own paper number."""
    runs = {}
    for readme, line, cmd in _commands():
        if readme == "configs/table1/README.md":
            m = _load_command(cmd).method
            runs[(m.self_kd, m.knowledge)] = PAPER_NUMBER.findall(line)[0]
    assert set(runs) == {
        (s, k) for s in ("ce", "ls", "cp", "proselflc", "mconf") for k in ("zero", "all", "cmd-s", "cmd-p")
    }
    assert runs[("mconf", "cmd-p")] == "69.09" and runs[("ce", "zero")] == "48.74"


def test_table5_cmdp_files_match_table1():
    for name in ("cmdp_mconf", "cmdp_proselflc"):
        a = load_config(CONFIGS / "table5" / f"{name}.yaml")
        b = load_config(CONFIGS / "table1" / f"{name}.yaml")
        assert _comparable(a) == _comparable(b), name


def test_table5_self_kd_trains_a_single_model_and_mkd_two():
    for name in ("ce", "tfkd_reg", "proselflc", "mconf"):
        cfg = load_config(CONFIGS / "table5" / f"{name}.yaml")
        assert len(cfg.peers) == 1, name
    for name, objective in (("kdcl", "kdcl"), ("syncmkd", "syncmkd"), ("cmdp_mconf", "cmd")):
        cfg = load_config(CONFIGS / "table5" / f"{name}.yaml")
        assert len(cfg.peers) == 2 and cfg.method.objective == objective, name


def test_docker_image_copies_files_that_exist_and_are_not_ignored():
    """Docker is not run in CI: at least check that every COPY source exists and the build context keeps it."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    sources = []
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    assert {"pyproject.toml", "cmd_dist", "tune", "configs"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"docker/Dockerfile copies {src}, which is not in the repo"
        assert src in kept, f"docker/Dockerfile.dockerignore drops {src} from the build context"
    # The image of Ray cluster nodes: `ray up` runs `docker run IMAGE bash` and KubeRay its own command, so no
    # ENTRYPOINT may capture them; `cmd-dist` is on PATH from `pip install .`.
    assert "ENTRYPOINT" not in dockerfile and "RUN pip install ." in dockerfile
