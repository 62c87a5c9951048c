"""Stable Diffusion's shape, in fp32 and in bf16 (the CPU stand-in for fp16 on CUDA).

Fast tier (default suite): SD v1.4's block layout with narrow channels (``conf/arch/sd_mid.yaml``)
in bf16, so half-precision dtype bugs fail CI: generation, trigger search, a fine-tuning step
(full and LoRA), NeMo's activations and Wanda.

Slow tier (``-m slow``): SD v1.4's exact shapes (``conf/arch/sd14_shape.yaml``: UNet 860M, VAE
84M, CLIP text 123M), built once with random weights and kept under the diffmem cache
(``sd14_shape-seed0``, ~4 GB of fp32 safetensors; never in the repo), and every stage run at
64 px (``DIFFMEM_SD_SHAPE_RES=128``: 128 px) in fp32 and bf16, asserting dtypes, finite outputs and a
peak-memory bound. Each stage's
seconds and peak RSS are printed (``-s``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffmem.loading import load_model
from diffmem.models import load_pipeline, save_pipeline
from diffmem.models.testbed import build_testbed_pipeline, cached_pipeline
from diffmem.probes import nemo as nemo_lib
from diffmem.probes import wanda as wanda_lib
from diffmem.probes.layers import record
from diffmem.probes.trigger import image_latents, search_trigger
from diffmem.sampling import denoise, encode_prompts, sample
from tests.conftest import CONF, SMALL_DATA

PROMPTS = ["a photo of a red car", "an oil painting of a lighthouse", "a cat on a sofa"]


@pytest.fixture(scope="module")
def mid_dir(tmp_path_factory) -> Path:
    return save_pipeline(
        build_testbed_pipeline(OmegaConf.load(CONF / "arch" / "sd_mid.yaml"), seed=0),
        tmp_path_factory.mktemp("sd-mid") / "model",
    )


@pytest.fixture(scope="module")
def mid_bf16(mid_dir):
    return load_pipeline(mid_dir, precision="bf16")


def _dtypes(pipe) -> set:
    return {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()}


def test_mid_generate_and_trigger_search_bf16(mid_bf16):
    pipe = mid_bf16
    assert _dtypes(pipe) == {torch.bfloat16}  # bf16 really runs in bf16 on the CPU
    cond = encode_prompts(pipe, PROMPTS[:1])
    assert cond.dtype == torch.bfloat16
    x = next(denoise(pipe, cond, [0], 64, 2, 5.0))
    assert x.dtype == torch.bfloat16 and x.shape == (1, 4, 8, 8)
    image = sample(pipe, cond, [0], 64, 2, 5.0)
    assert image.dtype == torch.float32 and image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    x0 = image_latents(pipe, image)
    emb, losses = search_trigger(pipe, x0, cond[0], steps=2, batch_size=2, seed=0)
    assert emb.dtype == torch.float32 and np.isfinite(losses).all()  # fp32 trainable against a bf16 UNet


@pytest.mark.parametrize("method", ["full", "lora"])
def test_mid_finetune_step_bf16(mid_dir, method, tmp_path):
    """A fine-tuning step on a bf16 pipeline with gradient checkpointing: fp32 trainables (master
    weights / LoRA), autocast, the frozen rest stays bf16, the loss is finite and the weights move."""
    from safetensors.torch import load_file

    from diffmem.mitigations.finetune import finetune, merge, prepare, transformer_blocks

    pipe = load_pipeline(mid_dir, precision="bf16")
    latents = image_latents(pipe, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    blocks = transformer_blocks(pipe.unet)[:2]  # a MemControl-style mask: mixed trainable and frozen blocks
    prepare(pipe.unet, method, blocks)
    trainable = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    s = OmegaConf.create(
        {
            "method": method,
            "steps": 1,
            "batch_size": 2,
            "lr": 1e-3,
            "ckpt_every": 1,
            "caption_dropout": 0.5,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True,
        }
    )  # recomputed in the backward: same dtypes
    losses = finetune(pipe, latents, PROMPTS[:2], s, seed=0, ckpt_dir=tmp_path / "ckpt")
    assert np.isfinite(losses[-1]["loss"])
    saved = load_file(next((tmp_path / "ckpt").glob("step-*")) / "model.safetensors")
    assert {saved[n].dtype for n in trainable} == {torch.float32}  # trained as fp32 master weights
    assert any(not torch.equal(before[n], saved[n]) for n in trainable)
    assert _dtypes(pipe) == {torch.bfloat16}  # back in the pipeline's precision
    merge(pipe.unet, method)
    image = sample(pipe, encode_prompts(pipe, PROMPTS[:1]), [0], 64, 2, 5.0)
    assert torch.isfinite(image).all()


def _forward_value_activations(pipe, cond, layers) -> dict[str, np.ndarray]:
    """NeMo's activations the old way: one full UNet forward, recording every ``to_v`` output."""
    unet = pipe.unet
    shape = (cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    with torch.no_grad(), record(unet, layers) as acts:
        unet(torch.zeros(shape, dtype=unet.dtype), torch.tensor(999), encoder_hidden_states=cond.to(unet.dtype))
    return {k: acts[k][0].abs().mean(dim=1).float().numpy() for k in layers}


def test_mid_nemo_values_from_text_alone_bf16(mid_bf16):
    """``to_v(c)`` gives exactly the UNet forward's value activations (max difference 0), so the
    same neurons are selected, at >= 100x fewer FLOPs per prompt."""

    pipe = mid_bf16
    layers = nemo_lib.nemo_layers(pipe)
    assert len(layers) == 7  # SD v1.4's down/mid attn2.to_v layers
    cond = encode_prompts(pipe, PROMPTS)
    fast, slow = nemo_lib.value_activations(pipe, cond, layers), _forward_value_activations(pipe, cond, layers)
    assert max(float(np.abs(fast[k] - slow[k]).max()) for k in layers) == 0.0
    stats = nemo_lib.ActivationStats.fit(nemo_lib.value_activations(pipe, encode_prompts(pipe, PROMPTS * 2), layers))
    picked = []
    for acts in (fast, slow):
        z = {k: v[0] for k, v in stats.zscores(acts).items()}
        score = lambda neurons: 1.0 - 0.01 * sum(map(len, neurons.values()))  # noqa: E731 (suppressed after 20)
        picked.append(nemo_lib.localise(z, score, threshold=0.8, max_checks=200).neurons)
    assert picked[0] == picked[1] and picked[0]
    seconds = []
    for fn in (
        lambda: nemo_lib.value_activations(pipe, cond[:1], layers),
        lambda: _forward_value_activations(pipe, cond[:1], layers),
    ):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    print(
        f"\nNeMo per-prompt activations on sd_mid (bf16, CPU): to_v(c) {seconds[0] * 1e3:.1f} ms, "
        f"UNet forward {seconds[1] * 1e3:.1f} ms"
    )


def test_nemo_cost_on_the_sd14_shape():
    """Per prompt, NeMo's ``to_v(c)`` costs >= 100x fewer FLOPs than the UNet forward it replaces,
    counted on SD v1.4's UNet at its 64x64 latents (built on the meta device: no memory)."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffmem.models.testbed import build_unet
    from diffmem.probes.layers import value_layers

    with torch.device("meta"):
        unet = build_unet(OmegaConf.load(CONF / "arch" / "sd14_shape.yaml"))
        c = torch.zeros(1, 77, 768)
        x = torch.zeros(1, 4, unet.config.sample_size, unet.config.sample_size)
        flops = []
        for fn in (
            lambda: [m(c) for m in value_layers(unet).values()],
            lambda: unet(x, torch.tensor(999), encoder_hidden_states=c),
        ):
            with FlopCounterMode(display=False) as counter:
                fn()
            flops.append(counter.get_total_flops())
    print(
        f"\nNeMo per-prompt activations on the SD v1.4 shape: to_v(c) {flops[0] / 1e9:.2f} GFLOP, "
        f"UNet forward {flops[1] / 1e9:.0f} GFLOP ({flops[1] / flops[0]:.0f}x)"
    )
    assert flops[1] >= 100 * flops[0]


def test_nemo_budget_caps_the_search():
    z = {"layer": np.linspace(3, 0, 40)}
    calls = []

    def score(neurons):
        calls.append(1)
        return 0.0 if len(neurons.get("layer", [])) >= 10 else 1.0

    found = nemo_lib.localise(z, score, threshold=0.5, theta_start=3.0, max_checks=12)
    assert found.suppressed and len(calls) <= 13  # the unblocked score plus at most 12 checks
    assert found.history[-1]["capped"]


def test_mid_wanda_bf16(mid_bf16):
    """Wanda on the bf16 pipeline keeps per-step column norms only; masks as from the full inputs."""
    pipe = mid_bf16
    cond = encode_prompts(pipe, PROMPTS[:1])[0]
    masks = wanda_lib.wanda_masks(pipe, cond, [0, 1], resolution=64, steps=3, guidance=5.0, n_steps=2, fraction=0.05)
    assert len(masks) == 16 and all(m.dtype == torch.bool and m.any() for m in masks.values())
    names = list(masks)
    with record(pipe.unet, names, what="input") as acts:  # the old way: every step's inputs kept
        for i, _ in enumerate(denoise(pipe, cond.unsqueeze(0).expand(2, -1, -1), [0, 1], 64, 3, 5.0)):
            if i + 1 >= 2:
                break
    for name in names:
        w = wanda_lib.get_layers(pipe.unet, [name])[name].weight.abs().float()
        want = torch.zeros_like(masks[name])
        for x in acts[name][:2]:
            x_u, x_c = x.float().chunk(2)
            want |= wanda_lib.row_topk_mask(
                w * x_c.reshape(-1, x.shape[-1]).norm(dim=0), w * x_u.reshape(-1, x.shape[-1]).norm(dim=0), 0.05
            )
        assert torch.equal(masks[name], want)


# --------------------------------------------------------------------------- slow: SD v1.4's shapes


def run_stage(stage: str, overrides: list[str]) -> tuple[Path, float, int]:
    """``(run dir, seconds, peak RSS in bytes)`` of ``diffmem <stage> <overrides>`` run in a
    fresh process (its own ``ru_maxrss``), so each stage's peak is its own, not this process's
    leftovers from the stages before it."""
    import subprocess
    import sys
    import tempfile

    from diffmem.config import compose

    run_dir = Path(compose(stage, overrides).run_dir)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "diffmem.cli", stage, *overrides], stdout=subprocess.DEVNULL, stderr=log
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        assert child.returncode == 0, f"diffmem {stage} failed: {log.read().decode()[-3000:]}"
    return run_dir, time.perf_counter() - start, usage.ru_maxrss * 1024


@pytest.fixture(scope="session")
def sd14_shape_dir() -> Path:
    """The SD-v1.4-shaped random pipeline, built once per machine under the real diffmem cache
    (``$DIFFMEM_SD_SHAPE_DIR`` overrides where)."""
    from diffmem.features.base import default_cache_dir

    where = os.environ.get("DIFFMEM_SD_SHAPE_DIR") or str(default_cache_dir() / "sd14_shape-seed0")
    return cached_pipeline(OmegaConf.load(CONF / "arch" / "sd14_shape.yaml"), where)


#: stages at 64 px (``DIFFMEM_SD_SHAPE_RES=128``: 128 px) with a couple of steps each, on a small
#: testbed generated at that resolution
RES = int(os.environ.get("DIFFMEM_SD_SHAPE_RES", "64"))
SD_RUN = [f"resolution={RES}", "steps=2", "guidance_scale=7.5", "seed=0"]
SD_DATA = [*SMALL_DATA, f"data.resolution={RES}"]
POSITIVES = ["positives.min_dup_count=4"]  # the small testbed's most duplicated canary counts as memorised
PEAK_GIB = 8.0  # every stage but full-UNet fine-tuning (a 860M UNet in fp32 + AdamW + grads: ~14 GiB)
FULL_UNET = ("full_ft", "train_rc", "train_noise_filter", "adversarial_ft")


def _available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def _stages(model_dir: Path, precision: str):
    model = [
        "model=local",
        f"model.path={model_dir}",
        f"model.precision={precision}",
        f"model.resolution={RES}",
        "model.num_inference_steps=2",
        "model.vae_slicing=true",
    ]
    common = [*model, *SD_DATA, *SD_RUN]
    judged = [*common, *POSITIVES]  # stages that pick memorised prompts
    yield (
        "generate",
        "generate",
        [*common, "n_per_prompt=1", "batch_size=4", "prompts.n_ordinary=2", "prompts.n_heldout=0"],
    )
    yield (
        "detect",
        "detect",
        [*model, *SD_DATA, *POSITIVES, f"resolution={RES}", "seed=0", "detect=noise_norm", "batch_size=4"],
    )
    probe = [*judged, "n_per_prompt=1", "max_targets=1", "n_controls=0"]
    yield (
        "probe trigger_search",
        "probe",
        [*probe, "probe=trigger_search", "probe.steps=2", "probe.restarts=1", "probe.batch_size=2"],
    )
    yield "probe nemo", "probe", [*probe, "probe=nemo", "probe.detector.n_seeds=2", "probe.max_checks=4"]
    yield (
        "probe wanda",
        "probe",
        [*probe, "probe=wanda", "probe.n_steps=1", "probe.n_seeds=1", "probe.save_model=false"],
    )
    fine = [
        "mitigation.steps=2",
        "mitigation.batch_size=1",
        "mitigation.ckpt_every=2",
        "objectives.enabled=false",
        "mitigation.gradient_checkpointing=true",
    ]
    for kind in ("lora", "memcontrol", "full_ft", "train_rc", "train_noise_filter"):
        extra = ["mitigation.noise_filter.n_calibration=4"] if kind == "train_noise_filter" else []
        yield kind, "mitigate", [*judged, f"mitigation={kind}", *fine, *extra]
    yield (
        "adversarial_ft",
        "mitigate",
        [
            *judged,
            "mitigation=adversarial_ft",
            *fine,
            "mitigation.refresh_every=2",
            "mitigation.trigger.steps=1",
            "mitigation.trigger.batch_size=1",
            "mitigation.surrogate.n_candidates=1",
            "mitigation.surrogate.n_steps=1",
        ],
    )
    for kind in ("wen", "gni", "random_tokens"):
        yield kind, "mitigate", [*judged, f"mitigation={kind}", "objectives.enabled=false"]


def test_sd14_shape_stage_configs_compose(tmp_path):
    """Every override of the slow tier below composes and validates (no model is loaded), so a
    renamed key fails the default suite, not an hour into ``-m slow``."""
    from diffmem.config import compose
    from diffmem.schema import validate

    runs = [
        *_stages(tmp_path / "sd14", "bf16"),
        ("evaluate", "evaluate-mitigation", _evaluation(tmp_path / "sd14", tmp_path / "lora", "bf16")),
    ]
    for label, stage, overrides in runs:
        validate(stage, compose(stage, [*overrides, f"run_dir={tmp_path / label.replace(' ', '-')}"]))


def _evaluation(original: Path, lora: Path, precision: str) -> list[str]:
    """evaluate-mitigation of the LoRA run against the original, at the tier's small budget."""
    return [
        *SD_DATA,
        *POSITIVES,
        *SD_RUN,
        f"precision={precision}",
        "vae_slicing=true",
        f"models.original={original}",
        f"+models.lora={lora}",
        "n_per_prompt=1",
        "max_targets=1",
        "trigger.steps=1",
        "trigger.restarts=1",
        "trigger.batch_size=1",
        "utility.n_prompts=2",
        "utility.n_per_prompt=1",
        f"name=sd-{precision}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sd14_shape_every_stage(sd14_shape_dir, precision):
    """Every stage on SD v1.4's shapes at ``RES`` px; per-stage seconds and peak RSS printed. Full-UNet
    fine-tuning runs only with 16 GiB available (it is skipped, and says so, on a smaller machine)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    runs = {}
    for label, stage, overrides in _stages(sd14_shape_dir, precision):
        if label in FULL_UNET and _available() < 16 * 2**30:
            print(
                f"{precision} {label:22s} skipped: full-UNet fine-tuning needs ~14 GiB, "
                f"{_available() / 2**30:.1f} GiB available",
                flush=True,
            )
            continue
        runs[label], seconds, peak = run_stage(stage, [*overrides, f"name={label.replace(' ', '-')}-{precision}"])
        print(f"{precision} {label:22s} {seconds:7.1f} s  peak RSS {peak / 2**30:5.2f} GiB", flush=True)
        assert (runs[label] / "_SUCCESS").exists()
        assert label in FULL_UNET or peak < PEAK_GIB * 2**30, f"{label}: {peak / 2**30:.1f} GiB"
        assert not (runs[label] / "checkpoints").exists()  # ~10 GB a full fine-tune: removed on _SUCCESS
        if label != "lora":
            shutil.rmtree(runs[label] / "model", ignore_errors=True)  # 4 GB each; the LoRA model is checked below
    adapter = sum(f.stat().st_size for f in (runs["lora"] / "model").rglob("*") if f.is_file())
    print(f"{precision} LoRA adapter folder {adapter / 2**20:.1f} MiB (a merged pipeline copy: ~4 GB)")
    assert adapter < 100 * 2**20
    pipe = load_model(runs["lora"] / "model", precision=precision)  # the adapter over the SD-shaped base
    assert _dtypes(pipe) == {dtype} and all(torch.isfinite(p).all() for p in pipe.unet.parameters())
    _, seconds, peak = run_stage("evaluate-mitigation", _evaluation(sd14_shape_dir, runs["lora"] / "model", precision))
    print(f"{precision} {'evaluate-mitigation':22s} {seconds:7.1f} s  peak RSS {peak / 2**30:5.2f} GiB")
    assert peak < PEAK_GIB * 2**30
