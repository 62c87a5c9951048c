"""The probe stage and its pieces: layer names from the model (testbed and SD layouts), hooks
that leave the model unchanged, seeded trigger search, NeMo's search on a hand-made score,
Wanda's masks on a hand-computed case, the Finding Dori table end to end, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import diffmem
from diffmem.data.selection import check_target
from diffmem.errors import ConfigError, DataError
from diffmem.probes import PROBES
from diffmem.probes.layers import block_neurons, ffn_layers, get_layers, record, value_layers
from diffmem.probes.nemo import localise, value_activations
from diffmem.probes.trigger import image_latents, search_trigger, search_triggers
from diffmem.probes.wanda import mask_iou, prune, row_topk_mask, union, wanda_masks
from diffmem.sampling import encode_prompts
from tests.conftest import SMALL_DATA

COMMON = [
    "steps=3",
    "n_per_prompt=2",
    "n_controls=1",
    "positives.min_dup_count=4",
    "prompts.n_ordinary=4",
    "prompts.n_heldout=2",
]
FAST = [
    "probe.trigger.steps=3",
    "probe.trigger.restarts=2",
    "probe.nemo.detector.n_seeds=2",
    "probe.nemo.detector.num_inference_steps=3",
    "probe.wanda.n_steps=2",
    "probe.wanda.n_seeds=1",
    "probe.wanda.fraction=0.05",
    *COMMON,
]


def _args(pipe_dir, *extra):
    return ["model=local", f"model.path={pipe_dir}", "features.extractor.size=8", *SMALL_DATA, *extra]


def _unet_out(pipe, cond):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    return pipe.unet(x, torch.tensor(500), encoder_hidden_states=cond).sample


# --- layers and hooks -----------------------------------------------------------------------


def test_layer_names_come_from_the_model_sd_v1_layout():
    """SD v1.x's block layout (3 cross-attention down blocks x 2, mid, 3 up blocks x 3) at tiny width."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 8, 8),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    values = value_layers(unet)
    assert len(values) == 7  # NeMo's 7 layers on SD v1.4
    assert list(values)[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    assert list(values)[-1] == "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    assert len(ffn_layers(unet)) == 16  # 6 down + 1 mid + 9 up transformer blocks
    assert len(value_layers(unet, ("up",))) == 9


def test_layer_names_on_the_testbed_and_unknown_names(tiny_pipe):
    assert list(value_layers(tiny_pipe.unet)) == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    with pytest.raises(
        ConfigError,
        match=r"no linear layer 'down_blocks.1.attentions.0.transformer_blocks.0"
        r".attn2.to_w'.*did you mean .*attn2.to_v",
    ):
        get_layers(tiny_pipe.unet, ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_w"])
    with pytest.raises(ConfigError, match="unknown block kind"):
        value_layers(tiny_pipe.unet, ("middle",))
    with pytest.raises(ConfigError, match="no linear layer"), block_neurons(tiny_pipe.unet, {"not.a.layer": [0]}):
        pass


def test_blocking_zeroes_channels_and_leaves_the_model_unchanged(tiny_pipe):
    cond = encode_prompts(tiny_pipe, ["the zorblax emblem", "a red circle above a blue square"])
    name = next(iter(value_layers(tiny_pipe.unet)))
    before = _unet_out(tiny_pipe, cond)
    with block_neurons(tiny_pipe.unet, {name: [0, 3]}), record(tiny_pipe.unet, [name]) as acts:
        blocked = _unet_out(tiny_pipe, cond)
    v = acts[name][0]
    assert torch.all(v[..., [0, 3]] == 0) and v[..., 1].abs().sum() > 0
    assert not torch.allclose(blocked, before)
    torch.testing.assert_close(_unet_out(tiny_pipe, cond), before, rtol=0, atol=0)  # hooks are gone
    with pytest.raises(RuntimeError, match="boom"), block_neurons(tiny_pipe.unet, {name: [1]}):
        raise RuntimeError("boom")
    torch.testing.assert_close(_unet_out(tiny_pipe, cond), before, rtol=0, atol=0)
    assert not any(m._forward_hooks for m in tiny_pipe.unet.modules())
    with pytest.raises(ConfigError, match="out of range"), block_neurons(tiny_pipe.unet, {name: [10_000]}):
        pass


# --- trigger search -------------------------------------------------------------------------


def test_trigger_search_is_seeded_and_leaves_weights_alone(tiny_pipe):
    x0 = image_latents(tiny_pipe, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    c = encode_prompts(tiny_pipe, ["the zorblax emblem"])[0]
    weights = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    a, la = search_trigger(tiny_pipe, x0, c, steps=5, lr=0.1, batch_size=2, seed=3)
    b, lb = search_trigger(tiny_pipe, x0, c, steps=5, lr=0.1, batch_size=2, seed=3)
    other, _ = search_trigger(tiny_pipe, x0, c, steps=5, lr=0.1, batch_size=2, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert la == lb and len(la) == 5
    assert not torch.equal(a, other) and not torch.equal(a, c)
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not any(p.requires_grad for p in tiny_pipe.unet.parameters())
    found = search_triggers(
        tiny_pipe,
        x0,
        c,
        prompt_id=7,
        restarts=3,
        inits=["prompt", "random", "other"],
        other_conds=encode_prompts(tiny_pipe, ["a red circle"]),
        steps=2,
        batch_size=2,
    )
    assert [t.init for t in found] == ["prompt", "random", "other"]
    assert all(t.distance > 0 for t in found)


def test_trigger_search_fits_a_target_with_a_fixed_budget(tiny_pipe):
    """The loss over the same (noise, t) draws falls when the trigger is optimised on them."""
    x0 = image_latents(tiny_pipe, torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    c = encode_prompts(tiny_pipe, ["the zorblax emblem"])[0]
    from diffusers import DDPMScheduler

    from diffmem.training import diffusion_loss

    sched = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    trig, _ = search_trigger(tiny_pipe, x0, c, steps=40, lr=0.1, batch_size=8, seed=0)

    def held_out_loss(cond):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(
                diffusion_loss(tiny_pipe.unet, sched, x0.expand(64, -1, -1, -1), cond[None].expand(64, -1, -1), g)
            )

    assert held_out_loss(trig) < held_out_loss(c)


def test_wrong_target_size_is_a_clear_error():
    with pytest.raises(DataError, match=r"target image 'x.png' is 64x64; the model generates 32x32"):
        check_target(torch.zeros(1, 3, 64, 64), 32, ["x.png"])


# --- NeMo -----------------------------------------------------------------------------------


def test_nemo_search_finds_the_responsible_neurons():
    """A hand-made score: memorisation is suppressed only when neurons a:3 and b:1 are both blocked."""
    z = {"a": np.array([0.1, 0.2, 0.3, 6.0, 2.0]), "b": np.array([0.5, 1.5, 0.1])}
    calls = []

    def score(neurons):
        calls.append(neurons)
        hit = (3 in neurons.get("a", [])) + (1 in neurons.get("b", []))
        return 1.0 - 0.45 * hit

    found = localise(z, score, threshold=0.2)
    assert found.neurons == {"a": [3], "b": [1]}
    assert found.suppressed and found.score_before == 1.0 and found.score_after == pytest.approx(0.1)
    assert found.checks == len(calls)
    assert found.history[1]["theta"] == 5.0  # first try: only |z| > 5
    unsuppressable = localise(z, lambda n: 1.0, threshold=0.2, refine=True)
    assert not unsuppressable.suppressed and unsuppressable.n_neurons == 8  # everything tried


def test_value_activations_depend_on_the_text_only(tiny_pipe):
    layers = list(value_layers(tiny_pipe.unet))
    cond = encode_prompts(tiny_pipe, ["the zorblax emblem", "a red circle above a blue square"])
    acts = value_activations(tiny_pipe, cond, layers, batch_size=1)
    assert acts[layers[0]].shape == (2, tiny_pipe.unet.config.block_out_channels[-1])
    direct = get_layers(tiny_pipe.unet, layers[:1])[layers[0]](cond).abs().mean(1)
    np.testing.assert_allclose(acts[layers[0]], direct.numpy(), rtol=1e-5)


# --- Wanda ----------------------------------------------------------------------------------


def test_wanda_row_topk_mask_hand_computed():
    score = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    base = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 9.0, 9.0]])
    mask = row_topk_mask(score, base, fraction=0.5)  # k = 2 per row among score > base
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    none = row_topk_mask(score, score + 1, fraction=0.5)  # nothing beats the baseline
    assert not none.any()
    a = {"l": torch.tensor([[True, False], [True, True]])}
    b = {"l": torch.tensor([[True, True], [False, False]])}
    assert union([a, b])["l"].sum() == 4 and mask_iou(a, b) == pytest.approx(1 / 4)


def test_wanda_masks_and_pruning(tiny_pipe):
    cond = encode_prompts(tiny_pipe, ["the zorblax emblem"])[0]
    masks = wanda_masks(tiny_pipe, cond, [1, 2], resolution=32, steps=4, guidance=3.0, n_steps=2, fraction=0.05)
    assert set(masks) == set(ffn_layers(tiny_pipe.unet))
    for name, m in masks.items():
        w = get_layers(tiny_pipe.unet, [name])[name].weight
        assert m.shape == w.shape and 0 < m.sum(1).max() <= 2 * int(np.ceil(0.05 * w.shape[1]))
    again = wanda_masks(tiny_pipe, cond, [1, 2], resolution=32, steps=4, guidance=3.0, n_steps=2, fraction=0.05)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    unet = __import__("copy").deepcopy(tiny_pipe.unet)
    n = prune(unet, masks)
    assert n == sum(int(m.sum()) for m in masks.values())
    for name, m in masks.items():
        assert torch.all(get_layers(unet, [name])[name].weight[m] == 0)
    with pytest.raises(ConfigError, match="needs guidance_scale != 1"):
        wanda_masks(tiny_pipe, cond, [1], resolution=32, steps=4, guidance=1.0)


# --- the stage ------------------------------------------------------------------------------


def test_probe_registry_and_configs():
    assert PROBES.names() == ["finding_dori", "locality", "nemo", "trigger_search", "wanda"]
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        PROBES.get("trigger_serch")


def test_finding_dori_end_to_end_and_resume(tiny_pipe_dir):
    args = _args(tiny_pipe_dir, "experiment=finding_dori", *FAST)
    run_dir = diffmem.run("probe", args)
    table = pd.read_parquet(run_dir / "finding_dori.parquet")
    assert list(zip(table["model"], table["attack"])) == [
        ("original", "none"),
        ("original", "trigger_search"),
        ("nemo", "none"),
        ("nemo", "trigger_search"),
        ("wanda", "none"),
        ("wanda", "trigger_search"),
        ("wanda", "trigger_search (control: non-memorised images)"),
    ]
    assert table["mr"].between(0, 1).all() and np.isfinite(table["similarity"]).all()
    triggers = pd.read_parquet(run_dir / "triggers.parquet")
    assert len(triggers) == (3 * 1 + 1) * 2 * 2  # (3 models x 1 target + 1 control) x restarts x gens
    assert all((run_dir / f).is_file() for f in triggers["image"])  # every trigger's generation kept
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_targets"] == 1 and "provenance" in metrics and (run_dir / "probe.png").exists()
    pruned = diffmem.models.load_pipeline(run_dir / "model")  # a usable diffusers model
    assert any((m.weight == 0).any() for m in ffn_layers(pruned.unet).values())
    assert not any((m.weight == 0).any() for m in ffn_layers(diffmem.models.load_pipeline(tiny_pipe_dir).unet).values())
    stamp = (run_dir / "finding_dori.parquet").stat().st_mtime_ns
    diffmem.run("probe", args)  # complete: nothing is redone
    assert (run_dir / "finding_dori.parquet").stat().st_mtime_ns == stamp


def test_probe_resumes_from_finished_parts(tiny_pipe_dir):
    args = _args(tiny_pipe_dir, "probe=trigger_search", "probe.steps=2", "probe.restarts=1", *COMMON)
    run_dir = diffmem.run("probe", args)
    first = pd.read_parquet(run_dir / "triggers.parquet")
    part = run_dir / "parts" / "attack-original-target-0.parquet"
    stamp = part.stat().st_mtime_ns
    (run_dir / "_SUCCESS").unlink()  # as if killed after the parts were written
    (run_dir / "triggers.parquet").unlink()
    diffmem.run("probe", args)
    assert part.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "triggers.parquet"), first)


@pytest.mark.parametrize(
    "extra, error",
    [
        (["probe.steps=0"], r"probe.steps must be >= 1"),
        (["probe.inits=[prompt,sideways]"], r"unknown init\(s\) \['sideways'\]"),
        (["probe=wanda", "probe.fraction=2"], r"probe.fraction must be in \(0, 1\]"),
        (["probe.name=nemo_neurons"], r"Did you mean 'nemo'"),
        (["positives.min_dup_count=1000"], r"no memorised prompt"),
        (["n_per_prompt=0"], r"n_per_prompt must be >= 1"),
    ],
)
def test_probe_bad_config(tiny_pipe_dir, extra, error):
    with pytest.raises((ConfigError, DataError), match=error):
        diffmem.run("probe", _args(tiny_pipe_dir, *COMMON, *extra))


def test_probe_empty_prompt_list(tiny_pipe_dir, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        diffmem.run("probe", _args(tiny_pipe_dir, "prompts=file", f"prompts.path={empty}"))


#: a locality probe small enough for the default suite (tests/test_distributed.py runs it on 2 ranks)
LOCALITY = [
    "probe=locality",
    "probe.trigger.steps=2",
    "probe.trigger.restarts=3",
    "probe.max_targets=1",
    "probe.nemo.detector.n_seeds=2",
    "probe.nemo.detector.num_inference_steps=3",
    "probe.nemo.refine=false",
    "probe.wanda.n_steps=2",
    "probe.wanda.n_seeds=1",
]


def test_locality_probe(tiny_pipe_dir):
    args = _args(
        tiny_pipe_dir,
        *LOCALITY,
        *COMMON,
    )
    run_dir = diffmem.run("probe", args)
    table = pd.read_parquet(run_dir / "locality.parquet")
    assert len(table) == 1 and table["triggers"].iloc[0] == 3
    row = table.iloc[0]
    assert row["trigger_distance"] > 0 and -1 <= row["activation_cosine_triggers"] <= 1
    assert 0 <= row["nemo_iou"] <= 1 and 0 <= row["wanda_iou"] <= 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["between_prompts"]) == {"embedding_distance", "activation_cosine"}
