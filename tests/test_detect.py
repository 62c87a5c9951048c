"""The detect stage and its detectors: finite, seeded scores, UNet budget, hand-computed values,
token attribution, ROC metrics against sklearn, an untouched model, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import diffmem
from diffmem.data.labels import ground_truth_labels
from diffmem.detectors import DETECTORS, build_detector, count_unet_evals
from diffmem.detectors.noise_norm import NoiseNorm
from diffmem.detectors.noise_ssim import mean_pairwise_ssim, minmax_per_channel
from diffmem.errors import ConfigError, DataError
from diffmem.metrics.detection import (
    DetectionMetrics,
    calibrate_threshold,
    detection_metrics,
    roc_auc,
    tpr_at_fpr,
)
from diffmem.sampling import encode_prompts, sample_seed
from tests.conftest import SMALL_DATA

CAPTIONS = [
    "the zorblax emblem",
    "a red circle above a blue square on a grey background",
    "a vintage poster",
    "two green triangles",
]
FAST = {
    "noise_norm": dict(steps=[0, 1], n_generations=2, num_inference_steps=4, guidance_scale=3.0),
    "noise_ssim": dict(n_seeds=3, step=1, num_inference_steps=4),
    "one_step": dict(n_seeds=2, num_inference_steps=4, guidance_scale=3.0),
    "attention_entropy": dict(steps=[0, 2], n_generations=2, num_inference_steps=4, guidance_scale=3.0),
    "bright_ending": dict(steps=[0, 3], n_generations=2, num_inference_steps=4, guidance_scale=3.0),
    "flipd": dict(n_generations=2, num_inference_steps=3, guidance_scale=3.0),
}


def _args(pipe_dir, *extra, prompt_file=None):
    """Stage arguments on the tiny pipeline; ``detect=noise_norm`` unless ``extra`` picks a detector."""
    prompts = (
        ["prompts=file", f"prompts.path={prompt_file}"]
        if prompt_file
        else ["prompts.n_ordinary=2", "prompts.n_heldout=2", "positives.min_dup_count=4"]
    )
    detector = [] if any(e.startswith("detect=") for e in extra) else ["detect=noise_norm"]
    return [
        "model=local",
        f"model.path={pipe_dir}",
        *detector,
        "detect.num_inference_steps=4",
        *prompts,
        *SMALL_DATA,
        *extra,
    ]


# --- detectors on the tiny pipeline --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAST))
def test_detectors_give_finite_seeded_scores(tiny_pipe, name):
    det = DETECTORS.build(name, **FAST[name])
    a = det.score(tiny_pipe, CAPTIONS, [3, 5, 7, 9], seed=0, resolution=32, batch_size=3)
    b = DETECTORS.build(name, **FAST[name]).score(
        tiny_pipe, CAPTIONS, [3, 5, 7, 9], seed=0, resolution=32, batch_size=3
    )
    assert a.shape == (4,) and a.dtype == np.float64 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # same config, same scores
    assert len(np.unique(a)) == 4  # prompts are told apart
    c = det.score(tiny_pipe, CAPTIONS, [3, 5, 7, 9], seed=1, resolution=32, batch_size=3)
    assert not np.allclose(a, c)  # the base seed matters


def test_noise_norm_unet_budget_and_batch_independence(tiny_pipe):
    first = NoiseNorm(steps=[0], n_generations=2, num_inference_steps=4, guidance_scale=3.0)
    with count_unet_evals(tiny_pipe.unet) as used:
        together = first.score(tiny_pipe, CAPTIONS, [10, 11, 12, 13], resolution=32, batch_size=8)
    assert used.evals == 2 * len(CAPTIONS) * 2  # one guided pair per prompt-generation
    assert "forward" not in vars(tiny_pipe.unet)  # the counter unwraps itself
    later = NoiseNorm(steps=[2], n_generations=1, num_inference_steps=4, guidance_scale=3.0)
    with count_unet_evals(tiny_pipe.unet) as used:
        later.score(tiny_pipe, CAPTIONS[:1], resolution=32)
    assert used.evals == 2 * 3  # steps 0..2 are run, step 3 is not
    alone = [
        first.score(tiny_pipe, [c], [pid], resolution=32, batch_size=1)[0]
        for c, pid in zip(CAPTIONS[::-1], [13, 12, 11, 10])
    ]
    np.testing.assert_allclose(alone[::-1], together, rtol=1e-5)
    mixed = first.score(tiny_pipe, [CAPTIONS[2], "something else"], [12, 99], resolution=32, batch_size=3)
    assert mixed[0] == pytest.approx(together[2], rel=1e-5)


def _ddim_alpha(sched, t):
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


def test_guidance_free_noise_norm_matches_hand_computation(tiny_pipe):
    """guidance 0: x_t follows the unconditional sampler; score = mean_t ||eps_c - eps_u||."""
    pid, seed, steps = 4, 7, 4

    def score(scored_steps, guidance=0.0):
        return NoiseNorm(steps=scored_steps, num_inference_steps=steps, guidance_scale=guidance).score(
            tiny_pipe, [CAPTIONS[1]], [pid], seed=seed, resolution=32
        )[0]

    unet, sched = tiny_pipe.unet, tiny_pipe.scheduler
    cond, uncond = encode_prompts(tiny_pipe, [CAPTIONS[1]]), encode_prompts(tiny_pipe, [""])
    x = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(sample_seed(seed, pid, 0)))[None]
    stride = 1000 // steps
    norms = []
    with torch.no_grad():
        for t in (751, 501):  # "leading" DDIM spacing with steps_offset 1
            eps_c = unet(x, t, encoder_hidden_states=cond).sample
            eps_u = unet(x, t, encoder_hidden_states=uncond).sample
            norms.append(float(torch.sqrt(((eps_c - eps_u) ** 2).sum())))
            a, a_prev = _ddim_alpha(sched, t), _ddim_alpha(sched, t - stride)
            x0 = (x - (1 - a).sqrt() * eps_u) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps_u
    assert score([1]) == pytest.approx(norms[1], rel=1e-5)
    assert score([0, 1]) == pytest.approx(np.mean(norms), rel=1e-5)
    assert score([0], guidance=5.0) == pytest.approx(norms[0], rel=1e-5)  # step 0: no guidance yet
    assert score([1], guidance=5.0) != pytest.approx(norms[1], rel=1e-4)  # later steps follow it


def test_attribution_one_row_per_token_and_is_the_gradient(tiny_pipe):
    det = NoiseNorm(steps=[0], num_inference_steps=4, guidance_scale=3.0)
    caption, pid = CAPTIONS[0], 2
    table = det.attribute(tiny_pipe, caption, pid, resolution=32)
    ids = tiny_pipe.tokenizer(caption).input_ids  # no padding: BOS, the words' tokens, EOS
    assert table["token_index"].tolist() == list(range(len(ids)))
    assert table["token"].tolist() == tiny_pipe.tokenizer.convert_ids_to_tokens(ids)
    assert np.isfinite(table["attribution"]).all() and (table["attribution"] > 0).all()

    # central finite differences of the score w.r.t. one token's input embedding
    token, h = 3, 1e-2
    emb = tiny_pipe.text_encoder.get_input_embeddings()
    dim = emb.embedding_dim

    def score_with(delta):
        handle = emb.register_forward_hook(lambda m, a, out: out + delta)
        try:
            return det.score(tiny_pipe, [caption], [pid], resolution=32)[0]
        finally:
            handle.remove()

    grad = np.zeros(dim)
    for j in range(dim):
        d = torch.zeros(1, tiny_pipe.tokenizer.model_max_length, dim)
        d[0, token, j] = h
        grad[j] = (score_with(d) - score_with(-d)) / (2 * h)
    assert table["attribution"][token] == pytest.approx(np.linalg.norm(grad), rel=2e-2)


def test_model_unchanged_by_detection(tiny_pipe):
    def snapshot():
        return {
            f"{name}.{k}": v.clone()
            for name in ("unet", "text_encoder", "vae")
            for k, v in getattr(tiny_pipe, name).state_dict().items()
        }

    before = snapshot()

    def flags():
        return [
            p.requires_grad for name in ("unet", "text_encoder", "vae") for p in getattr(tiny_pipe, name).parameters()
        ]

    before_flags = flags()
    for name in FAST:
        DETECTORS.build(name, **FAST[name]).score(tiny_pipe, CAPTIONS[:2], resolution=32)
    NoiseNorm(steps=[0, 1], num_inference_steps=4).attribute(tiny_pipe, CAPTIONS[0], resolution=32)
    after = snapshot()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags() == before_flags
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())
    assert all(p.grad is None for p in tiny_pipe.text_encoder.parameters())


def test_noise_ssim_pieces_and_one_step_sign(tiny_pipe):
    x = np.random.default_rng(0).normal(size=(3, 4, 8, 8))
    x[0, 1] = 2.0  # a constant channel
    n = minmax_per_channel(x)
    assert n.min() >= 0 and n.max() <= 1 and n[1, 2].min() == 0 and n[1, 2].max() == 1
    assert np.all(n[0, 1] == 0)
    assert mean_pairwise_ssim(np.stack([n[1]] * 3)) == pytest.approx(1.0)
    assert mean_pairwise_ssim(n) < 0.5
    plus = DETECTORS.build("one_step", **FAST["one_step"]).score(tiny_pipe, CAPTIONS[:2], resolution=32)
    minus = DETECTORS.build("one_step", **FAST["one_step"], higher_mse_is_memorised=False).score(
        tiny_pipe, CAPTIONS[:2], resolution=32
    )
    assert (plus > 0).all()
    np.testing.assert_allclose(minus, -plus)


# --- ROC metrics --------------------------------------------------------------------------


def test_detection_metrics_hand_case_and_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve

    # sorted: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): 3 of 4 pairs ordered -> AUC 0.75
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    assert roc_auc(scores, labels) == 0.75
    assert tpr_at_fpr(scores, labels, 0.01) == 0.5  # threshold 0.8: TPR 1/2 at FPR 0
    assert tpr_at_fpr(scores, labels, 0.5) == 1.0
    assert roc_auc([1, 1, 0], [1, 0, 0]) == 0.75  # a tie counts one half
    out = DetectionMetrics(fpr=0.01)(scores, labels)
    assert out == {"roc_auc": 0.75, "tpr_at_fpr": 0.5, "fpr": 0.01, "n_pos": 2, "n_neg": 2}

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + y * 1.5
    s[:40] = np.round(s[:40])  # some ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    for limit in (0.0, 0.01, 0.1, 0.3):
        assert tpr_at_fpr(s, y, limit) == pytest.approx(tpr[fpr <= limit].max())
    assert detection_metrics(-s, y)["roc_auc"] == pytest.approx(1 - roc_auc_score(y, s))

    assert calibrate_threshold([0.2, 0.4, 0.6]) == pytest.approx(0.4 + 0.2)  # mean + sample std
    with pytest.raises(DataError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(DataError, match="0 .* or 1"):
        roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ConfigError, match="fpr"):
        tpr_at_fpr(scores, labels, 1.5)


def test_ground_truth_labels():
    tb = pd.DataFrame({"kind": ["canary", "canary", "template", "ordinary", "heldout"], "dup_count": [64, 4, 32, 1, 0]})
    pos = OmegaConf.to_container(diffmem.compose("detect").positives)  # conf/positives/default.yaml
    # the rare canary is a hard negative and the template (in neither list) left out
    got = ground_truth_labels(tb, pos)
    assert got[0] == 1 and np.isnan(got[1]) and np.isnan(got[2]) and got[3] == 0 and got[4] == 0
    both = {**pos, "memorised": ["verbatim", "template"], "min_dup_count": 4}
    assert ground_truth_labels(tb, both).tolist()[:3] == [1, 1, 1]
    got = ground_truth_labels(tb, {**both, "exclude": ["template"]})
    assert got.tolist()[:2] == [1, 1] and np.isnan(got[2])
    nemo = pd.DataFrame(
        {"memorisation_type": ["verbatim", "template", "none", None], "is_memorised": [True, True, False, True]}
    )
    got = ground_truth_labels(nemo, pos)
    assert got[0] == 1 and np.isnan(got[1]) and got[2] == 0 and got[3] == 1  # type unknown: its label
    assert ground_truth_labels(pd.DataFrame({"caption": ["x"]}), pos) is None
    with pytest.raises(ConfigError, match="unknown field"):
        ground_truth_labels(tb, {"min_dupcount": 3})
    with pytest.raises(ConfigError, match="missing field.*not_memorised"):
        ground_truth_labels(tb, {"memorised": ["verbatim"], "min_dup_count": 4, "exclude": []})
    with pytest.raises(ConfigError, match="'verbatm' is not a memorisation type.*verbatim"):
        ground_truth_labels(tb, {**pos, "exclude": ["verbatm"]})


# --- the stage ----------------------------------------------------------------------------


def test_detect_stage_outputs(tiny_pipe_dir):
    run_dir = diffmem.run("detect", _args(tiny_pipe_dir, "attribution=true"))
    res = diffmem.load_run(run_dir)
    assert res.done and run_dir.name == "noise_norm-local"
    scores, attr = res.table("scores"), res.table("attribution")
    assert {"prompt_id", "caption", "detector", "score", "kind", "dup_count", "label"} <= set(scores.columns)
    assert scores["prompt_id"].is_unique and np.isfinite(scores["score"]).all()
    assert (scores["detector"] == "noise_norm").all()
    canary4 = scores[(scores.kind == "canary") & (scores.dup_count == 4)]
    assert (canary4["label"] == 1).all() and scores.loc[scores.kind == "template", "label"].isna().all()
    m = res.metrics
    assert m["unet_calls"] == 2 * len(scores)  # steps=[0], one generation
    sub = scores[scores["label"].notna()]
    assert m["roc_auc"] == pytest.approx(roc_auc(sub["score"], sub["label"]))
    for key in ("roc_auc", "tpr_at_fpr"):  # 95 % bootstrap intervals around the point values
        lo, hi = m[f"{key}_ci"]
        assert 0 <= lo <= m[key] <= hi <= 1 and m["ground_truth"][f"{key}_ci"] == [lo, hi]
    assert m["ci_level"] == 0.95
    assert m["ground_truth"]["n_pos"] == int(sub["label"].sum())
    assert "threshold" in m["ground_truth"]["calibrated_threshold"]
    assert (run_dir / "roc.png").stat().st_size > 1000
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipe_dir / "tokenizer")
    n_tokens = [len(tokenizer(c).input_ids) for c in scores["caption"]]  # no padding rows
    assert attr.groupby("prompt_id").size().loc[scores["prompt_id"]].tolist() == n_tokens
    page = (run_dir / "report.html").read_text()
    assert "Per-token attribution" in page and "ROC curve" in page
    assert page.count('<div class="prompt">') == len(scores)  # every prompt's tokens shown
    top = attr.loc[attr.groupby("prompt_id")["attribution"].idxmax()].iloc[0]
    assert f'title="{top.attribution:.4g}" style="background:rgba(214,39,40,1.00)' in page  # the peak token

    again = diffmem.run("detect", _args(tiny_pipe_dir, "attribution=true", "name=again"))
    pd.testing.assert_frame_equal(scores, pd.read_parquet(again / "scores.parquet"))
    info = json.loads((run_dir / "info.json").read_text())
    assert info["unet_calls"] == m["unet_calls"] and info["config"]["detect"]["steps"] == [0]


def test_detect_stage_other_detector_without_ground_truth(tiny_pipe_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the zorblax emblem\na vintage poster\n")
    run_dir = diffmem.run("detect", _args(tiny_pipe_dir, "detect=noise_ssim", "detect.n_seeds=2", prompt_file=prompts))
    res = diffmem.load_run(run_dir)
    assert len(res.table("scores")) == 2 and "label" not in res.table("scores")
    assert res.metrics["unet_calls"] == 2 * 2 and "roc_auc" not in res.metrics
    assert not (run_dir / "roc.png").exists()


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("detect.name=noise_nrom", ConfigError, "Did you mean 'noise_norm'"),
        ("detect.steps=[-1]", ConfigError, "steps must be >= 0"),
        ("detect.steps=[4]", ConfigError, "steps must be < num_inference_steps=4"),
        ("+detect.stepz=1", ConfigError, "stepz"),
        ("batch_size=0", ConfigError, "batch_size must be >= 1"),
        ("+positives.min_dupcount=2", ConfigError, "unknown field"),
    ],
)
def test_bad_config_is_refused_before_anything_is_written(tiny_pipe_dir, override, error, message):
    cfg = diffmem.compose("detect", _args(tiny_pipe_dir, override))
    with pytest.raises(error, match=message):
        diffmem.run("detect", _args(tiny_pipe_dir, override))
    assert not Path(cfg.run_dir).exists()


def test_bad_inputs(tiny_pipe, tiny_pipe_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        diffmem.run("detect", _args(tiny_pipe_dir, prompt_file=empty))
    with pytest.raises(DataError, match="prompt list is empty"):
        DETECTORS.build("noise_norm").score(tiny_pipe, [])
    with pytest.raises(ConfigError, match="attribution"):
        diffmem.run("detect", _args(tiny_pipe_dir, "detect=one_step", "attribution=true"))
    with pytest.raises(ConfigError, match="n_seeds must be >= 2"):
        build_detector({"name": "noise_ssim", "n_seeds": 1})
    with pytest.raises(ConfigError, match="reduction"):
        build_detector({"name": "noise_norm", "reduction": "median"})


def test_noise_norm_separates_duplicated_canaries_on_the_shipped_testbed():
    """Issue 4's bar: canaries duplicated >= 16x vs ordinary + held-out prompts, at noise_norm's
    cheap default (first step, one generation: 2 UNet evaluations per prompt), ROC-AUC >= 0.99."""
    run_dir = diffmem.run("detect", ["detect=noise_norm"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["unet_calls_per_prompt"] == 2
    assert metrics["ground_truth"]["n_pos"] == 8 and metrics["ground_truth"]["n_neg"] >= 29
    assert metrics["roc_auc"] >= 0.99, metrics["by_group"]
    # the 1x/4x canaries trained on and never copied in the model's memorisation.json: 7 of 8
    # (one 4x canary copied in 1 of its 8 evaluation generations is left out)
    hard = metrics["ground_truth"]["hard_negatives"]
    assert hard["n_neg"] == 7 and 0.6 <= hard["roc_auc"] < 0.9  # about 0.77


def test_bootstrap_intervals_reference_cases():
    """Replicates equal the metrics of the resampled prompts; a binormal sample's AUC interval
    covers the true AUC with Hanley & McNeil's (1982) width; perfect separation collapses it."""
    from scipy.stats import norm

    from diffmem.metrics.detection import bootstrap_ci, bootstrap_replicates

    rng = np.random.default_rng(1)
    y = np.r_[np.ones(30, int), np.zeros(70, int)]
    s = rng.normal(size=100) + 1.0 * y
    s[:10] = np.round(s[:10], 1)  # ties
    reps = bootstrap_replicates(s, y, fpr=0.05, n_boot=5, seed=3)
    r = np.random.default_rng(3)  # the same draws, by hand
    ip, ineg = r.integers(0, 30, (5, 30)), r.integers(0, 70, (5, 70))
    for b in range(5):
        ss = np.r_[s[y == 1][ip[b]], s[y == 0][ineg[b]]]
        yy = np.r_[np.ones(30, int), np.zeros(70, int)]
        assert reps["roc_auc"][b] == pytest.approx(roc_auc(ss, yy))
        assert reps["tpr_at_fpr"][b] == pytest.approx(tpr_at_fpr(ss, yy, 0.05))

    d, n_pos, n_neg = 1.2, 200, 400
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = rng.normal(size=y.size) + d * y
    true_auc = norm.cdf(d / np.sqrt(2))
    ci = bootstrap_ci(s, y, n_boot=2000)["roc_auc"]
    a = roc_auc(s, y)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg))
    assert ci[0] < true_auc < ci[1] and ci[0] < a < ci[1]
    assert (ci[1] - ci[0]) / 2 == pytest.approx(1.96 * se, rel=0.2)

    sep = detection_metrics([0.1, 0.2, 0.3, 0.9, 0.95], [0, 0, 0, 1, 1], ci_level=0.95)
    assert sep["roc_auc_ci"] == [1.0, 1.0] and sep["tpr_at_fpr_ci"] == [1.0, 1.0] and sep["ci_level"] == 0.95
    swap = detection_metrics([0.1, 0.2, 0.3, 0.9, 0.05], [0, 0, 0, 1, 1], ci_level=0.9)
    assert swap["roc_auc_ci"][0] < swap["roc_auc"] == 0.5 < swap["roc_auc_ci"][1] <= 1.0
    with pytest.raises(ConfigError, match="level"):
        bootstrap_ci(s, y, level=95)


def test_copy_detection_thresholds_in_the_shared_metrics():
    out = detection_metrics([0.9, 0.6, 0.4, 0.8, 0.2], [1, 1, 1, 0, 0], thresholds=(0.5, 0.95))
    assert out["roc_auc"] == pytest.approx(4 / 6) and out["positive_median"] == 0.6
    assert out["negative_median"] == pytest.approx(0.5)
    assert out["precision@0.5"] == pytest.approx(2 / 3) and out["recall@0.5"] == pytest.approx(2 / 3)
    assert out["precision@0.95"] is None and out["recall@0.95"] == 0.0


def test_copied_rare_canaries_are_no_hard_negatives(tmp_path):
    """A canary below the memorised tier that the model copies anyway (its memorisation.json)
    is neither a hard negative nor a negative; one never copied stays a hard negative."""
    from diffmem.data.labels import ground_truth, ground_truth_labels
    from diffmem.metrics.memorisation import with_copy_shares

    prompts = pd.DataFrame(
        {
            "caption": ["big", "four copied", "four clean", "one clean", "scene"],
            "kind": ["canary", "canary", "canary", "canary", "ordinary"],
            "dup_count": [64, 4, 4, 1, 1],
        }
    )
    gens = [
        {"caption": c, "copy": k < n} for c, n in [("big", 8), ("four copied", 3), ("four clean", 0)] for k in range(8)
    ]
    (tmp_path / "memorisation.json").write_text(json.dumps({"per_generation": gens}))
    measured = with_copy_shares(prompts, tmp_path)
    assert measured["copy_share"].tolist()[:3] == [1.0, 3 / 8, 0.0] and measured["copy_share"][3:].isna().all()
    positives = diffmem.compose("detect").positives
    before = ground_truth(prompts, 16)["hard_negative"].tolist()
    assert before == [False, True, True, True, False]  # by tier alone
    assert ground_truth(measured, 16)["hard_negative"].tolist() == [False, False, True, True, False]
    labels = ground_truth_labels(measured, positives)
    assert labels[0] == 1 and np.isnan(labels[1]) and labels[4] == 0  # the copied 4x one: left out
    assert with_copy_shares(prompts, tmp_path / "none").equals(prompts)  # a model without the file


@pytest.mark.parametrize("model", ["testbed", pytest.param("testbed_photo", marks=pytest.mark.slow)])
def test_default_detector_holds_on_the_shipped_testbeds(model):
    """Issue 26's bar for the default ``diffmem detect``: ROC-AUC >= 0.99 and TPR@1%FPR >= 0.8
    (canaries >= 16x vs ordinary + held-out), and memorised vs hard negatives AUC >= 0.9."""
    run_dir = diffmem.run("detect", [f"model={model}", f"data={model}"])
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["detector"] == diffmem.compose("detect").detect.name == "noise_ssim"
    assert m["unet_calls_per_prompt"] == 10  # 10 seeds, one unguided pass each
    assert m["ground_truth"]["n_pos"] == 8 and m["roc_auc"] >= 0.99 and m["tpr_at_fpr"] >= 0.8, m["by_group"]
    hard = m["ground_truth"]["hard_negatives"]
    # the 1x/4x canaries never copied in memorisation.json (the photo model copies every 4x one)
    assert hard["n_neg"] == {"testbed": 7, "testbed_photo": 4}[model] and hard["roc_auc"] >= 0.9, hard
    assert m["roc_auc_ci"][0] <= m["roc_auc"] <= m["roc_auc_ci"][1] and len(hard["roc_auc_ci"]) == 2


def test_detect_benchmark_suite_builds_and_tabulates():
    """Every detector setting of ``benchmarks/bench_detect.py`` composes and builds, and its
    metrics / table come from a scores table as the stage's would."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_detect.py"
    spec = importlib.util.spec_from_file_location("bench_detect", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    built = {label: build_detector(diffmem.compose("detect", overrides).detect) for label, overrides in bench.SUITE}
    assert set(DETECTORS.names()) <= {d.name for d in built.values()}  # every registered detector is benchmarked
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "score": np.r_[rng.normal(2, 1, 8), rng.normal(1, 1, 8), rng.normal(0, 1, 60)],
            "label": np.r_[np.ones(8), np.full(8, np.nan), np.zeros(60)],
            "hard_negative": np.r_[np.zeros(8, bool), np.ones(8, bool), np.zeros(60, bool)],
            "evals_per_prompt": 10.0,
            "seconds_per_prompt": 0.1,
        }
    )
    m = bench.suite_metrics(table)
    known = table[table.label.notna()]
    assert m["roc_auc"] == pytest.approx(roc_auc(known.score, known.label)) and m["n_hard"] == 8
    assert m["hard_roc_auc"] == pytest.approx(roc_auc(table.score[:16], np.r_[np.ones(8), np.zeros(8)]))
    lines = bench.markdown({tb: {"x": m} for tb in bench.TESTBEDS}).splitlines()
    assert len(lines) == 3 and lines[2].count("[") == 3 * len(bench.TESTBEDS)


def test_ci_level_is_one_setting_end_to_end(tiny_pipe_dir, tmp_path):
    """A setting added in one place (conf/detect.yaml, with its range in the schema): it reaches the
    metrics, a changed value refuses to resume the run dir, and an out-of-range value is one line."""
    import json

    base = [
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "prompts=file",
        f"run_dir={tmp_path / 'run'}",
        "resolution=32",
        "detect=noise_norm",
    ]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    files = (
        f"prompts.files=[{{path: {prompts}, label: positive}}, {{path: {prompts.with_name('n.txt')}, label: negative}}]"
    )
    prompts.with_name("n.txt").write_text("a green star\na grey cloud\n")
    run = diffmem.run("detect", [*base, files, "ci_level=0.9"])
    assert json.loads((run / "metrics.json").read_text())["ground_truth"]["ci_level"] == 0.9
    with pytest.raises(ConfigError, match="ci_level: 0.9 there, 0.8 now"):
        diffmem.run("detect", [*base, files, "ci_level=0.8"])
    with pytest.raises(ConfigError, match="ci_level"):
        diffmem.run("detect", [*base, files, "ci_level=1.5", f"run_dir={tmp_path / 'other'}"])
