"""The mitigate stage on the tiny pipeline: every mitigation a few steps end to end, block
masks named by path on SD's layout, LoRA confined to the masked blocks, caption augmentations
on hand cases, defences that load as models, exact resume, the Optuna study and its front."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffmem
from diffmem.config import compose
from diffmem.errors import ConfigError, DataError
from diffmem.loading import load_model
from diffmem.mitigate import task
from diffmem.mitigations import captions as cap
from diffmem.mitigations.defences import GaussianNoise, RandomTokens, WenMinimisation, read_defence
from diffmem.mitigations.finetune import lora_targets, merge, prepare, selected_blocks, transformer_blocks
from diffmem.mitigations.memcontrol import pareto_mask, remaining_trials, study_table
from diffmem.models import load_pipeline
from diffmem.models.adapters import is_adapter, read_adapter
from diffmem.sampling import encode_prompts
from tests.conftest import SMALL_DATA

COMMON = [
    "steps=3",
    "positives.min_dup_count=4",
    "prompts.n_ordinary=4",
    "prompts.n_heldout=2",
    "objectives.n_prompts=4",
    "features.extractor.size=8",
    *SMALL_DATA,
]
FT = ["mitigation.steps=3", "mitigation.ckpt_every=2"]
ADV = [
    "mitigation.steps=4",
    "mitigation.refresh_every=2",
    "mitigation.trigger.steps=2",
    "mitigation.ckpt_every=2",
    "mitigation.surrogate.n_candidates=2",
    "mitigation.surrogate.n_steps=2",
]


def _cfg(pipe_dir, name, *extra):
    return compose("mitigate", [f"mitigation={name}", "model=local", f"model.path={pipe_dir}", *COMMON, *extra])


def _unet(run_dir):
    return load_file(str(next((run_dir / "model" / "unet").glob("*.safetensors"))))


def _published_unet(run_dir):
    """The UNet weights of the published model as every stage loads it (a pipeline or an adapter)."""
    return {k: v.contiguous() for k, v in load_model(run_dir / "model").unet.state_dict().items()}


def _sd_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 8, 8),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


# --- block masks and LoRA -------------------------------------------------------------------


def test_mask_genes_are_block_paths_on_the_sd_layout():
    unet = _sd_unet()
    blocks = transformer_blocks(unet)
    assert len(blocks) == 16  # MemControl's 16 genes on SD v1
    assert blocks[0] == "down_blocks.0.attentions.0" and "mid_block.attentions.0" in blocks
    assert "up_blocks.3.attentions.2" in blocks
    nested = {
        "down_blocks": {"2": {"attentions": {"1": 1}}},
        "mid_block": {"attentions": {"0": 0}},
        "up_blocks.1.attentions.2": 1,
    }
    assert selected_blocks(unet, nested) == ["down_blocks.2.attentions.1", "up_blocks.1.attentions.2"]
    assert selected_blocks(unet, None) == blocks
    with pytest.raises(
        ConfigError,
        match=r"'down_blocks.3.attentions.0' is not a transformer block.*"
        r"Did you mean 'down_blocks.2.attentions.0'",
    ):
        selected_blocks(unet, {"down_blocks.3.attentions.0": 1})
    with pytest.raises(ConfigError, match="must be 0 or 1"):
        selected_blocks(unet, {"mid_block.attentions.0": 2})
    targets = lora_targets(unet, ["mid_block.attentions.0"])
    assert len(targets) == 8 and all(t.startswith("mid_block.attentions.0.transformer_blocks.0.attn") for t in targets)


def test_lora_trains_only_the_masked_blocks_and_merges_to_a_plain_unet(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir)
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    n = prepare(unet, "lora", ["mid_block.attentions.0"], rank=2)
    names = [k for k, p in unet.named_parameters() if p.requires_grad]
    assert names and all(k.startswith("mid_block.attentions.0.") and "lora_" in k for k in names)
    assert n == sum(p.numel() for p in unet.parameters() if p.requires_grad)
    with torch.no_grad():
        for k, p in unet.named_parameters():
            if "lora_B" in k:
                p.add_(0.05)
    merge(unet, "lora")
    after = unet.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mid_block.attentions.0.transformer_blocks.0.attn") for k in changed)
    untouched = load_pipeline(tiny_pipe_dir).unet
    assert prepare(untouched, "lora", []) == 0  # an all-zero mask: nothing trains
    merge(untouched, "lora")
    assert set(untouched.state_dict()) == set(before)
    with pytest.raises(ConfigError, match="method 'dora' is not one of full, lora"):
        prepare(unet, "dora", [])


# --- caption augmentations and defences ------------------------------------------------------


def test_caption_augmentations_on_hand_cases():
    rng = np.random.default_rng(0)
    pool = ["alpha", "beta", "gamma"]
    out = cap.insert_random_words("a red circle", pool, 2, rng)
    assert len(out.split()) == 5 and sum(w in pool for w in out.split()) == 2
    assert cap.random_caption("a red circle", pool, rng).split()[0] in pool
    assert len(cap.random_caption("a red circle", pool, rng).split()) == 3
    rep = cap.repeat_words("red circle", 2, rng).split()
    assert len(rep) == 4 and set(rep) <= {"red", "circle"}
    assert cap.testbed_alternatives("a red circle above a blue square")[1] == "a blue square below a red circle"
    assert "the zorb badge" in cap.testbed_alternatives("the zorb emblem")
    caps = ["a red circle above a blue square"] * 50
    assert cap.augmenter("rc", 0.0, pool)(caps, rng) == caps
    changed = cap.augmenter("rt", 1.0, pool)(caps, rng)
    assert all(len(c.split()) == 9 for c in changed)
    a = cap.augmenter("cwr", 0.3, pool)(caps, np.random.default_rng(5))
    assert a == cap.augmenter("cwr", 0.3, pool)(caps, np.random.default_rng(5))  # seeded
    assert 5 < sum(c != caps[0] for c in a) < 30
    with pytest.raises(ConfigError, match="augment.kind 'xx' is not one of mc, rc, rt, cwr"):
        cap.augmenter("xx", 0.1, pool)


def test_defences_are_seeded_per_sample(tiny_pipe):
    cond = encode_prompts(tiny_pipe, ["the zorb emblem", "a red circle"])
    gni = GaussianNoise(lam=0.1)
    both = gni.embedding(tiny_pipe, cond, [11, 12])
    one = gni.embedding(tiny_pipe, cond[1:], [12])
    torch.testing.assert_close(both[1:], one, rtol=0, atol=0)  # batch-independent
    assert 0.05 < float((both - cond).std()) < 0.15
    rt = RandomTokens(n_words=2)
    text = rt.text(["the zorb emblem", ""], tiny_pipe)
    assert len(text[0].split()) == 5 and text[1] == ""
    assert rt.text(["the zorb emblem"], tiny_pipe) == text[:1]  # seeded by the prompt
    from diffmem.detectors.noise_norm import noise_norm_trajectory

    uncond = encode_prompts(tiny_pipe, [""])
    d0 = noise_norm_trajectory(tiny_pipe, cond, uncond, [1, 2], 32, [0], 5, 5.0)[:, 0]
    wen = WenMinimisation(target=float(d0.min()) * 0.5, max_iters=5, lr=0.05)
    new = wen.embedding(tiny_pipe, cond, [1, 2], resolution=32, steps=5, guidance=5.0)
    d1 = noise_norm_trajectory(tiny_pipe, new, uncond, [1, 2], 32, [0], 5, 5.0)[:, 0]
    assert (d1 < d0).all()
    torch.testing.assert_close(new[:, 0], cond[:, 0], rtol=0, atol=0)  # BOS frozen
    idle = WenMinimisation(target=float(d0.max()) * 2)
    torch.testing.assert_close(
        idle.embedding(tiny_pipe, cond, [1, 2], resolution=32, steps=5, guidance=5.0), cond, rtol=0, atol=0
    )  # already at the target: unchanged
    with pytest.raises(ConfigError, match="target must be > 0"):
        WenMinimisation(target=None)


def test_defence_wrapper_stores_its_base_so_it_reloads_anywhere(tmp_path, monkeypatch):
    """A repo id stays a repo id; a local base relative to the cwd is made absolute."""
    from diffmem.mitigations.defences import save_defence

    save_defence(tmp_path / "hub", GaussianNoise(), "CompVis/stable-diffusion-v1-4")
    assert read_defence(tmp_path / "hub")[0] == "CompVis/stable-diffusion-v1-4"
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    save_defence(tmp_path / "local", GaussianNoise(), "base")
    assert read_defence(tmp_path / "local")[0] == str((tmp_path / "base").resolve())


# --- the stage, end to end --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "full_ft",
        "lora",
        "memcontrol",
        "train_mc",
        "train_rc",
        "train_rt",
        "train_cwr",
        "train_gni",
        "train_noise_filter",
    ],
)
def test_fine_tuning_mitigations_publish_a_model_and_both_objectives(tiny_pipe_dir, name):
    extra = ["+mitigation.mask.mid_block.attentions.0=1"] if name == "memcontrol" else []
    cfg = _cfg(tiny_pipe_dir, name, *FT, *extra)
    values = task(cfg)
    assert len(values) == 2 and all(np.isfinite(values)) and values[1] > 0
    run_dir = Path(cfg.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["objectives"]["memorisation"] == values[0]
    assert metrics["provenance"]["config"]["mitigation"]["name"] == name
    before, after = load_file(str(next((tiny_pipe_dir / "unet").glob("*.safetensors")))), _published_unet(run_dir)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert set(after) == set(before) and changed
    lora = name in ("lora", "memcontrol")  # published as the adapter over the base, not a pipeline copy
    assert metrics["published"] == ("adapter" if lora else "pipeline") and is_adapter(run_dir / "model") == lora
    if name == "memcontrol":
        assert all(k.startswith("mid_block.attentions.0.") for k in changed)
        assert metrics["blocks"] == ["mid_block.attentions.0"] and metrics["trainable_share"] < 0.05
    if name == "train_noise_filter":
        assert metrics["tau"] == json.loads((run_dir / "tau.json").read_text())["tau"] > 0
    if not lora:
        load_pipeline(run_dir / "model")  # a plain diffusers folder
    assert not (run_dir / "checkpoints").exists()  # removed once _SUCCESS is written (keep_checkpoints=false)


def test_an_all_zero_mask_publishes_the_model_unchanged(tiny_pipe_dir):
    """MemControl's NSGA-II may propose switching every block off: a valid trial, no training."""
    cfg = _cfg(tiny_pipe_dir, "memcontrol", *FT, "+mitigation.mask.mid_block.attentions.0=0")
    values = task(cfg)
    assert len(values) == 2 and all(np.isfinite(values))
    before = load_file(str(next((tiny_pipe_dir / "unet").glob("*.safetensors"))))
    after = _published_unet(Path(cfg.run_dir))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["trainable_params"] == 0
    assert read_adapter(Path(cfg.run_dir) / "model") == (str(tiny_pipe_dir.resolve()), None)  # no weights: KBs


def test_a_lora_adapter_loads_as_the_merged_pipeline_it_replaces(tiny_pipe_dir, tmp_path):
    """``publish: adapter`` (the default for LoRA) and ``publish: pipeline`` of one run give the
    same UNet once loaded, in fp32 and bf16; the adapter folder is a small fraction of the copy."""
    runs = {}
    for publish in ("adapter", "pipeline"):
        cfg = _cfg(
            tiny_pipe_dir,
            "lora",
            *FT,
            "objectives.enabled=false",
            f"mitigation.publish={publish}",
            f"name=lora-{publish}",
        )
        task(cfg)
        runs[publish] = Path(cfg.run_dir) / "model"
    assert is_adapter(runs["adapter"]) and not is_adapter(runs["pipeline"])
    size = {k: sum(f.stat().st_size for f in v.rglob("*") if f.is_file()) for k, v in runs.items()}
    assert size["adapter"] < 0.2 * size["pipeline"]
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, p = (load_model(runs[k], precision=precision).unet.state_dict() for k in ("adapter", "pipeline"))
        assert set(a) == set(p) and {v.dtype for v in a.values()} == {dtype}
        for k in a:  # fp32: identical; bf16: fused after the cast vs cast after fusing, one ulp apart at most
            ulp = 0.0 if precision == "fp32" else 2.0**-7 * float(p[k].float().abs().max())
            assert float((a[k].float() - p[k].float()).abs().max()) <= ulp, (precision, k)


def test_adapter_folders_refuse_bad_files(tiny_pipe_dir, tmp_path):
    cfg = _cfg(tiny_pipe_dir, "lora", *FT, "objectives.enabled=false", "name=lora-bad")
    task(cfg)
    model = Path(cfg.run_dir) / "model"
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    (bad / "lora.safetensors").write_bytes((bad / "lora.safetensors").read_bytes()[:100])
    with pytest.raises(DataError, match=r"bad/lora.safetensors: unreadable adapter weights"):
        load_model(bad)
    spec = json.loads((model / "adapter.json").read_text())
    (bad / "adapter.json").write_text(json.dumps({**spec, "lora": {"r": 4}}))
    with pytest.raises(DataError, match=r"adapter.json: field 'lora' must be null or hold r, lora_alpha"):
        load_model(bad)
    (bad / "adapter.json").write_text(json.dumps({**spec, "base": str(tmp_path / "gone")}))
    with pytest.raises(DataError, match=r"cannot load pipeline .*gone"):
        load_model(bad)


@pytest.mark.parametrize("name", ["wen", "gni", "random_tokens"])
def test_defences_publish_wrappers_every_stage_loads(tiny_pipe_dir, name):
    cfg = _cfg(tiny_pipe_dir, name)
    assert task(cfg) is None
    model = Path(cfg.run_dir) / "model"
    base, defence = read_defence(model)
    assert base == str(tiny_pipe_dir.resolve()) and defence.name == name
    if name == "wen":
        assert defence.target > 0  # calibrated on the non-memorised prompts
    out = diffmem.run(
        "generate",
        [
            "model=local",
            f"model.path={model}",
            "steps=2",
            "prompts.n_ordinary=1",
            "prompts.n_heldout=1",
            "n_per_prompt=1",
            *SMALL_DATA,
        ],
    )
    assert (out / "samples.parquet").exists()
    with pytest.raises(ConfigError, match="is an inference-time defence"):
        task(_cfg(model, "full_ft", *FT, "name=stacked"))


def test_adversarial_ft_end_to_end_and_exact_resume(tiny_pipe_dir):
    args = [
        "mitigation=adversarial_ft",
        "model=local",
        f"model.path={tiny_pipe_dir}",
        *COMMON,
        *ADV,
        "keep_checkpoints=true",
    ]  # kept after _SUCCESS, so a kill can be simulated below
    run_dir = diffmem.run("mitigate", args)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trigger_refreshes"] == 2 and metrics["n_targets"] >= 1
    assert (run_dir / "surrogates.parquet").exists()
    first = _unet(run_dir)
    before = load_file(str(next((tiny_pipe_dir / "unet").glob("*.safetensors"))))
    assert any(not torch.equal(first[k], before[k]) for k in first)
    # as if killed during step 3: the step-2 checkpoint is the latest, the second trigger set unsaved
    for name in ("_SUCCESS", "info.json", "metrics.json", "triggers/refresh-00001.safetensors"):
        (run_dir / name).unlink()
    for name in ("model", "checkpoints/step-0000004"):
        shutil.rmtree(run_dir / name)
    diffmem.run("mitigate", args)
    again = _unet(run_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # killed again, with its surrogates, first trigger set and step-2 checkpoint damaged since:
    # each is recomputed (from scratch), not trusted, and the model is again the same
    for name in ("_SUCCESS", "info.json", "metrics.json"):
        (run_dir / name).unlink()
    for name in ("model", "checkpoints/step-0000004"):
        shutil.rmtree(run_dir / name)
    for name in (
        "surrogates.safetensors",
        "triggers/refresh-00000.safetensors",
        "checkpoints/step-0000002/model.safetensors",
    ):
        (run_dir / name).write_bytes((run_dir / name).read_bytes()[:40])
    diffmem.run("mitigate", args)
    again = _unet(run_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize(
    "name, extra", [("adversarial_ft", ADV), ("full_ft", [*FT, "mitigation.gradient_checkpointing=true"])]
)
def test_fine_tuning_on_a_bf16_pipeline(tiny_pipe_dir, name, extra):
    """The fp32 master UNet under bf16 autocast, the text encoder and captions in bf16: the
    published weights are finite and moved (the SD-shaped tier runs the same at SD's size)."""
    run_dir = diffmem.run(
        "mitigate",
        [
            f"mitigation={name}",
            "model=local",
            f"model.path={tiny_pipe_dir}",
            "model.precision=bf16",
            *COMMON,
            *extra,
            "objectives.enabled=false",
            f"name={name}-bf16",
        ],
    )
    before, after = load_file(str(next((tiny_pipe_dir / "unet").glob("*.safetensors")))), _unet(run_dir)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_bad_mitigation_configs_are_one_line_errors(tiny_pipe_dir):
    with pytest.raises(ConfigError, match=r"unknown mitigation kind 'finetun'.*Did you mean 'finetune'"):
        task(_cfg(tiny_pipe_dir, "full_ft", "mitigation.kind=finetun"))
    with pytest.raises(ConfigError, match=r"mitigation.steps must be >= 1 \(got -3\)"):  # the schema's
        diffmem.run(
            "mitigate",
            ["mitigation=full_ft", "model=local", f"model.path={tiny_pipe_dir}", *COMMON, "mitigation.steps=-3"],
        )
    with pytest.raises(ConfigError, match=r"mitigation.trigger.lr must be > 0"):
        task(_cfg(tiny_pipe_dir, "adversarial_ft", "mitigation.trigger.lr=0"))
    with pytest.raises(ConfigError, match="not a transformer block"):
        task(_cfg(tiny_pipe_dir, "memcontrol", *FT, "+mitigation.mask.mid_block.attention.0=1"))
    with pytest.raises(DataError, match="no memorised prompt"):
        task(_cfg(tiny_pipe_dir, "full_ft", "positives.min_dup_count=1000"))


# --- MemControl's study ----------------------------------------------------------------------


def test_pareto_mask_on_a_hand_case():
    v = np.array([[1, 5], [2, 2], [3, 1], [3, 3], [1, 6], [2, 2]])
    assert pareto_mask(v).tolist() == [True, True, True, False, False, True]


def test_memcontrol_study_runs_as_an_optuna_multirun_and_resumes(tiny_pipe_dir, tmp_path):
    """The NSGA-II study through Hydra's Optuna sweeper with SQLite storage: each trial returns
    both objectives; a re-launch runs only the missing trials; the front reads back."""
    out = tmp_path / "outputs"
    base = [
        sys.executable,
        "-m",
        "diffmem.cli",
        "mitigate",
        "experiment=memcontrol",
        "model=local",
        f"model.path={tiny_pipe_dir}",
        *COMMON,
        *FT,
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler.population_size=2",
    ]
    env = {**os.environ, "DIFFMEM_OUTPUTS": str(out), "OMP_NUM_THREADS": "1"}

    def launch(total):
        r = subprocess.run(
            [*base, f"total_trials={total}"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    launch(3)
    storage = f"sqlite:///{out / 'mitigate' / 'multirun' / 'memcontrol.db'}"
    table = study_table(storage, "memcontrol-local")
    assert len(table) == 3 and table["pareto"].any()
    assert {"mitigation.lr", "mitigation.mask.mid_block.attentions.0"} <= set(table.columns)
    assert remaining_trials(storage, "memcontrol-local", 3) == 0
    launch(3)  # nothing missing: no new trial
    assert len(study_table(storage, "memcontrol-local")) == 3
    launch(4)  # one more
    table = study_table(storage, "memcontrol-local")
    assert len(table) == 4 and sorted(table["trial"]) == [0, 1, 2, 3]
    trials = sorted((out / "mitigate" / "multirun" / "memcontrol").glob("trial-*"))
    assert len(trials) >= 3 and all((t / "objectives.json").exists() for t in trials)
