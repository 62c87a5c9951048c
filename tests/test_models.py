"""Loading pipelines, the offline CLIP tokenizer and the testbed architecture."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from diffmem.errors import ConfigError, DataError
from diffmem.models import load_pipeline
from diffmem.models.tokenizer import build_clip_tokenizer


def test_tokenizer_matches_open_clip(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    ref = open_clip.get_tokenizer("ViT-B-32")
    for text in [
        "a red circle above a blue square on a grey background",
        "the zorblax emblem, photo!",
        "Plans for a living room: 3D render  don't",
    ]:
        ids = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        want = [i for i in ref([text])[0].tolist() if i]
        assert ids[: len(want)] == want and len(ids) == 77
    assert len(tok) == 49408 and tok.model_max_length == 77


def test_saved_pipeline_is_plain_diffusers_safetensors(tiny_pipe_dir):
    index = json.loads((tiny_pipe_dir / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert not list(tiny_pipe_dir.rglob("*.bin")) and list(tiny_pipe_dir.rglob("*.safetensors"))


def test_load_pipeline_cpu_fp32_and_scheduler_swap(tiny_pipe_dir):
    pipe = load_pipeline(tiny_pipe_dir, precision="fp16", scheduler="euler")
    assert pipe.unet.dtype == torch.float32  # fp32 on CPU whatever the config says
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    names = [n for n, _ in pipe.unet.named_modules()]
    assert any(n.endswith("attn2.to_v") for n in names) and any(n.endswith("ff.net.2") for n in names)


def test_load_pipeline_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(DataError, match="cannot load pipeline 'no-such/repo-id'"):
        load_pipeline("no-such/repo-id")
    with pytest.raises(ConfigError, match="scheduler 'fancy'"):
        from diffmem.models.pipeline import set_scheduler

        set_scheduler(None, "fancy")


def test_save_in_half_precision_loads_as_fp32(tiny_pipe, tmp_path):
    from safetensors import safe_open

    from diffmem.models import save_pipeline

    out = save_pipeline(tiny_pipe, tmp_path / "half", dtype="float16")
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    assert tiny_pipe.unet.dtype == torch.float32  # the pipeline in memory is untouched
    again = load_pipeline(out)
    assert again.unet.dtype == torch.float32
    a, b = tiny_pipe.unet.state_dict(), again.unet.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-2
