"""Every root config composes with every option of its groups; the CLI dispatches stages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import diffmem
from diffmem.config import CONF_DIR, STAGES, config_name
from diffmem.errors import ConfigError
from diffmem.schema import validate


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _experiment_stage(name: str) -> str:
    """Experiment files name the stage they are a delta of in a ``# stage: <name>`` line."""
    for line in (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines():
        if line.startswith("# stage:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"experiment/{name}.yaml has no '# stage: <name>' line")


def _cases():
    for stage in STAGES.names():
        root = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config_name(stage)}.yaml").defaults)
        groups = [next(iter(d)) for d in root if isinstance(d, dict)]
        yield stage, None
        for group in groups:
            if group in ("paths", "hydra"):
                continue
            for option in _options(group):
                if group != "experiment" or _experiment_stage(option) == stage:
                    yield stage, f"{group}={option}"


def test_cases_cover_every_group_option():
    composed = {override for _, override in _cases() if override}
    for group in (
        "model",
        "data",
        "prompts",
        "arch",
        "features",
        "index",
        "mitigation",
        "experiment",
        "detect",
        "probe",
        "positives",
        "trigger",
        "debug",
    ):
        for option in _options(group):
            assert f"{group}={option}" in composed


@pytest.mark.parametrize("stage,override", list(_cases()))
def test_every_config_composes_and_resolves(stage, override):
    cfg = diffmem.compose(stage, [override] if override else [])
    assert cfg.stage == stage
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert plain["run_dir"].endswith(f"{stage}/{plain['name']}")
    validate(stage, cfg)  # the schema never rejects a shipped config


def test_shared_groups_replace_copies():
    """positives/ and trigger/ are config groups: every stage that reads them gets the same values."""
    pos = [diffmem.compose(s).positives for s in ("detect", "probe", "mitigate", "evaluate-mitigation")]
    assert all(p == pos[0] for p in pos) and pos[0].min_dup_count == 16
    attack = diffmem.compose("evaluate-mitigation").trigger
    probe = diffmem.compose("probe").probe
    dori = diffmem.compose("probe", ["probe=finding_dori"]).probe.trigger
    assert all(probe[k] == v == dori[k] for k, v in attack.items()) and probe.name == "trigger_search"
    refresh = diffmem.compose("mitigate").mitigation.trigger
    assert refresh.steps == 20 and "restarts" not in refresh


def test_audit_composes_its_sub_stages_defaults():
    audit = diffmem.compose("audit", ["generate.batch_size=7"])
    for node, stage in (("generate", "generate"), ("embed", "embed"), ("index_stage", "index")):
        own = diffmem.compose(stage)
        for key in ("batch_size", "part_size", "shard", "num_shards", "mode", "recall"):
            if key in own and not (node == "generate" and key == "batch_size"):
                assert audit[node][key] == own[key], (node, key)
    assert audit.generate.batch_size == 7 and audit.generate.model == audit.model
    assert audit.embed.features == audit.features and audit.index_stage.index == audit.index


def test_debug_configs_shrink_any_stage():
    for stage in STAGES.names():
        cfg = OmegaConf.to_container(diffmem.compose(stage, ["debug=fast"]), resolve=True)
        assert cfg["paths"]["output_dir"].endswith("debug") and cfg["n_per_prompt"] == 1
    assert diffmem.compose("generate", ["debug=fast"]).steps == 5


@pytest.mark.slow
@pytest.mark.parametrize("name", _options("experiment"))
def test_experiment_smoke_sweep(name, tmp_path):
    """Every experiment=* through its stage's CLI (as Hydra composes it, launcher and sweeper
    included) with debug=fast, printed instead of run."""
    stage = _experiment_stage(name)
    out = subprocess.run(
        [sys.executable, "-m", "diffmem.cli", stage, f"experiment={name}", "debug=fast", "--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert f"stage: {stage}" in out.stdout


def test_experiment_testbed_is_a_delta():
    base = diffmem.compose("train")
    exp = diffmem.compose("train", ["experiment=testbed"])
    assert exp.get("arch") is not None and base.get("arch") is None
    assert exp.unet.steps != base.unet.steps and exp.data == base.data


def test_launcher_configs_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for launcher, cls in [
            ("slurm", "SlurmLauncher"),
            ("slurm_cpu", "SlurmLauncher"),
            ("slurm_node", "SlurmLauncher"),
            ("submitit_local", "LocalLauncher"),
        ]:
            cfg = compose("generate", [f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith(cls)
        node = compose("generate", ["hydra/launcher=slurm_node"], return_hydra_config=True).hydra.launcher
        assert (node.tasks_per_node, node.gpus_per_node, node.max_num_timeout) == (8, 8, 3)  # one rank per GPU


def test_unknown_stage_suggests_close_name():
    with pytest.raises(ConfigError, match="Did you mean 'generate'"):
        diffmem.compose("generat")


def test_cli_help_and_unknown_stage():
    out = subprocess.run([sys.executable, "-m", "diffmem.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "diffmem.cli", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'train'" in bad.stderr.lower()
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_config_error_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "diffmem.generate", "steps=-3"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "diffmem generate: error: steps must be >= 1 (got -3)"


def test_a_single_run_is_composed_once(tmp_path, monkeypatch):
    """A stage's CLI composes a single run once and runs it as hydra.main would (run dir,
    ``.hydra/``, mode RUN); ``-m`` still sweeps through hydra.main."""
    from hydra._internal.hydra import Hydra

    from diffmem.config import hydra_app

    composed, seen = [], []
    real = Hydra.compose_config
    monkeypatch.setattr(Hydra, "compose_config", lambda self, *a, **k: composed.append(1) or real(self, *a, **k))
    monkeypatch.chdir(tmp_path)
    main = hydra_app("embed", lambda cfg: seen.append(cfg) or len(seen))
    monkeypatch.setattr(sys, "argv", ["embed", f"paths.output_dir={tmp_path}", "name=one", "batch_size=3"])
    assert main() == 1 and len(composed) == 1
    run_dir = tmp_path / "embed" / "one"
    assert seen[0].run_dir == str(run_dir) and seen[0].batch_size == 3 and "hydra" not in seen[0]
    hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
    assert hydra_cfg.mode == "RUN" and list(hydra_cfg.overrides.task)[-1] == "batch_size=3"
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").batch_size == 3

    monkeypatch.setattr(sys, "argv", ["embed", "-m", f"paths.output_dir={tmp_path}", "name=sweep", "batch_size=1,2"])
    main()
    assert [cfg.batch_size for cfg in seen[1:]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "embed" / "multirun" / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]


def test_local_configs_join_the_search_path(tmp_path, monkeypatch):
    """A git-ignored local/ folder holds machine settings: here a SLURM launcher with a partition."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = tmp_path / "hydra" / "launcher"
    launcher.mkdir(parents=True)
    (launcher / "mycluster.yaml").write_text("defaults:\n  - slurm\npartition: gpu-a100\naccount: proj42\n")
    monkeypatch.setenv("DIFFMEM_LOCAL_CONF", str(tmp_path))
    cfg = diffmem.compose("mitigate", ["hydra/launcher=mycluster"], return_hydra_config=True)
    assert cfg.hydra.launcher.partition == "gpu-a100" and cfg.hydra.launcher.account == "proj42"
    assert cfg.hydra.launcher.max_num_timeout == 3  # the rest from conf/hydra/launcher/slurm.yaml
    monkeypatch.setenv("DIFFMEM_LOCAL_CONF", str(tmp_path / "absent"))
    with pytest.raises(Exception, match="mycluster"):
        diffmem.compose("mitigate", ["hydra/launcher=mycluster"], return_hydra_config=True)
