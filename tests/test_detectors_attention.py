"""The cross-attention detectors (Ren et al.'s entropy, Chen et al.'s bright ending): the probe
changes nothing, hand-made attention maps give known values, costs in UNet evaluations, and
both run in bf16 on Stable Diffusion's block layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffmem.detectors import DETECTORS, count_unet_evals
from diffmem.detectors import bright_ending as be_module
from diffmem.detectors.attention import cross_attention, entropy, token_distribution, token_map
from diffmem.detectors.noise_norm import NoiseNorm
from diffmem.errors import ConfigError, DataError
from diffmem.models.testbed import build_testbed_pipeline
from diffmem.sampling import encode_prompts, initial_latents, token_counts
from tests.conftest import CONF

CAPTIONS = ["the zorblax emblem", "a red circle above a blue square on a grey background", "a vintage poster"]


def test_hand_made_attention_maps():
    k = 8
    assert entropy(torch.full((k,), 1 / k)).item() == pytest.approx(math.log(k))
    assert entropy(torch.tensor([1.0, 0, 0, 0])).item() == 0.0
    assert entropy(torch.tensor([0.5, 0.5, 0, 0])).item() == pytest.approx(math.log(2))
    # [B=1, heads=2, queries=4, tokens=3]: head 0 all on token 0, head 1 uniform over tokens 0-1
    probs = torch.zeros(1, 2, 4, 3)
    probs[0, 0, :, 0] = 1
    probs[0, 1, :, :2] = 0.5
    dist = token_distribution(probs)
    assert torch.allclose(dist, torch.tensor([[0.75, 0.25, 0.0]]))
    assert entropy(dist).item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # token maps: each row's own token, on the 2x2 grid, resized (2x2 -> 2x2 is the identity)
    probs = torch.rand(2, 3, 4, 5).softmax(-1)
    got = token_map(probs, torch.tensor([4, 1]), (2, 2))
    assert torch.allclose(got[0], probs[0, :, :, 4].mean(0).reshape(2, 2))
    assert torch.allclose(got[1], probs[1, :, :, 1].mean(0).reshape(2, 2))
    assert token_map(probs, torch.tensor([0, 0]), (8, 8)).shape == (2, 8, 8)


def test_probe_records_without_changing_the_unet(tiny_pipe):
    unet = tiny_pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    cond = encode_prompts(tiny_pipe, CAPTIONS)
    x = initial_latents(tiny_pipe, [1, 2, 3], 32)
    with torch.no_grad():
        plain = unet(x, 500, encoder_hidden_states=cond).sample
        seen = {}
        with cross_attention(unet, lambda name, p: seen.setdefault(name, p)) as names:
            probed = unet(x, 500, encoder_hidden_states=cond).sample
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before  # processors restored
    assert sorted(seen) == sorted(names) and all(n.endswith("attn2") for n in names)  # each layer seen
    torch.testing.assert_close(probed, plain, rtol=1e-4, atol=1e-5)
    for p in seen.values():
        assert p.shape[0] == 3 and p.shape[-1] == cond.shape[1]
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


def test_attention_entropy_is_the_first_step_entropy_at_one_evaluation(tiny_pipe):
    det = DETECTORS.build("attention_entropy", num_inference_steps=4, guidance_scale=3.0)
    with count_unet_evals(tiny_pipe.unet) as used:
        scores = det.score(tiny_pipe, CAPTIONS, [5, 6, 7], resolution=32)
    assert used.evals == len(CAPTIONS)  # the conditional pass of step 0 only
    from diffmem.sampling import fresh_scheduler, sample_seed

    sched = fresh_scheduler(tiny_pipe, 4)
    x = initial_latents(tiny_pipe, [sample_seed(0, p, 0) for p in (5, 6, 7)], 32) * sched.init_noise_sigma
    seen = []
    with torch.no_grad(), cross_attention(tiny_pipe.unet, lambda n, p: seen.append(p.float().mean((1, 2)))):
        tiny_pipe.unet(
            sched.scale_model_input(x, sched.timesteps[0]),
            sched.timesteps[0],
            encoder_hidden_states=encode_prompts(tiny_pipe, CAPTIONS),
        )
    dist = torch.stack(seen).mean(0)
    by_hand = -(dist * dist.log()).sum(-1)
    np.testing.assert_allclose(scores, by_hand.double().numpy(), rtol=1e-5)
    assert (scores < math.log(tiny_pipe.tokenizer.model_max_length) + 1e-6).all()
    first = DETECTORS.build("attention_entropy", layers=[0], num_inference_steps=4).score(
        tiny_pipe, CAPTIONS, resolution=32
    )
    assert not np.allclose(first, scores)
    with pytest.raises(ConfigError, match="cross-attention layers"):
        DETECTORS.build("attention_entropy", layers=[99], num_inference_steps=4).score(
            tiny_pipe, CAPTIONS[:1], resolution=32
        )


def test_bright_ending_with_a_flat_mask_is_noise_norm(tiny_pipe, monkeypatch):
    settings = dict(steps=[0, 2], num_inference_steps=4, guidance_scale=3.0, n_generations=2)
    with count_unet_evals(tiny_pipe.unet) as used:
        real = DETECTORS.build("bright_ending", **settings).score(tiny_pipe, CAPTIONS, resolution=32)
    assert used.evals == len(CAPTIONS) * 2 * (2 * 3 + 1)  # 3 guided steps + the last step's conditional pass
    wen = NoiseNorm(**settings).score(tiny_pipe, CAPTIONS, resolution=32)
    assert not np.allclose(real, wen, rtol=1e-3)  # the end-token map is not flat
    monkeypatch.setattr(be_module, "token_map", lambda probs, token, size: torch.full((probs.shape[0], *size), 0.3))
    flat = DETECTORS.build("bright_ending", **settings).score(tiny_pipe, CAPTIONS, resolution=32)
    np.testing.assert_allclose(flat, wen, rtol=1e-5)


def test_bright_ending_reads_the_end_token(tiny_pipe, monkeypatch):
    n = token_counts(tiny_pipe, CAPTIONS)
    assert n == [len(tiny_pipe.tokenizer(c).input_ids) for c in CAPTIONS]
    seen = []
    real_map = be_module.token_map
    monkeypatch.setattr(be_module, "token_map", lambda p, token, size: seen.append(token) or real_map(p, token, size))
    det = DETECTORS.build("bright_ending", signal="end_attention", num_inference_steps=2)
    scores = det.score(tiny_pipe, CAPTIONS, resolution=32)
    assert seen[-1].tolist() == [c - 1 for c in n] and ((scores > 0) & (scores < 1)).all()
    with pytest.raises(DataError, match="token count"):
        det.score_conditioning(tiny_pipe, encode_prompts(tiny_pipe, CAPTIONS), resolution=32)
    with pytest.raises(ConfigError, match="signal"):
        DETECTORS.build("bright_ending", signal="bright")


@pytest.mark.parametrize("name", ["attention_entropy", "bright_ending"])
def test_attention_detectors_in_bf16_on_the_sd_layout(name):
    pipe = build_testbed_pipeline(OmegaConf.load(CONF / "arch" / "sd_mid.yaml"), seed=0).to(torch.bfloat16)
    det = DETECTORS.build(name, num_inference_steps=2, guidance_scale=5.0)
    scores = det.score(pipe, CAPTIONS[:2], resolution=64)
    assert scores.dtype == np.float64 and np.isfinite(scores).all() and scores[0] != scores[1]
