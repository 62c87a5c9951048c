"""The testbed architecture: a tiny Stable-Diffusion-style pipeline (same classes as SD)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from omegaconf import DictConfig


def build_testbed_pipeline(arch: DictConfig, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised ``StableDiffusionPipeline`` from the ``arch`` config.

    VAE (AutoencoderKL), UNet2DConditionModel with cross-attention, CLIPTextModel and
    a CLIPTokenizer built from open_clip's bundled BPE file; DDPM noise schedule with
    a DDIM sampler, exactly as SD ships them.
    """
    from diffusers import DDIMScheduler
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffmem.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=arch.vae.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * len(arch.vae.channels),
        up_block_types=["UpDecoderBlock2D"] * len(arch.vae.channels),
        block_out_channels=list(arch.vae.channels),
        layers_per_block=arch.vae.layers_per_block,
        norm_num_groups=arch.vae.norm_groups,
        sample_size=arch.resolution,
    )
    text_cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=arch.text.hidden,
        intermediate_size=arch.text.hidden * 4,
        num_hidden_layers=arch.text.layers,
        num_attention_heads=arch.text.heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=arch.text.hidden,
    )
    text_encoder = CLIPTextModel(text_cfg)
    unet = build_unet(arch)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    # diffusers annotates the scheduler as an enum and the safety checker as required
    pipeline_class: Any = StableDiffusionPipeline
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_unet(arch: DictConfig) -> UNet2DConditionModel:
    """The ``UNet2DConditionModel`` of an ``arch`` config (random weights; under
    ``torch.device("meta")`` no memory at all, e.g. to count SD's FLOPs)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=arch.resolution // 2 ** (len(arch.vae.channels) - 1),
        in_channels=arch.vae.latent_channels,
        out_channels=arch.vae.latent_channels,
        down_block_types=list(arch.unet.down_blocks),
        up_block_types=list(arch.unet.up_blocks),
        block_out_channels=list(arch.unet.channels),
        layers_per_block=arch.unet.layers_per_block,
        cross_attention_dim=arch.text.hidden,
        attention_head_dim=arch.unet.head_dim,
        norm_num_groups=arch.unet.norm_groups,
    )


def cached_pipeline(arch: DictConfig, path: str | Path, seed: int = 0) -> Path:
    """:func:`build_testbed_pipeline` of ``arch`` saved at ``path`` (fp32 safetensors) the first
    time, reused afterwards: the SD-shaped random pipeline (``conf/arch/sd14_shape.yaml``, ~4 GB)
    is built once per machine, not once per test run."""
    from diffmem.models.pipeline import is_pipeline_dir, save_pipeline

    path = Path(path)
    if not is_pipeline_dir(path):
        save_pipeline(build_testbed_pipeline(arch, seed=seed), path)
    return path
