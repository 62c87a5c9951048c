"""The testbed architecture: a tiny Stable-Diffusion-style pipeline (same classes as SD)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def build_testbed_pipeline(arch, seed: int = 0):
    """A randomly initialised ``StableDiffusionPipeline`` from the ``arch`` config.

    VAE (AutoencoderKL), UNet2DConditionModel with cross-attention, CLIPTextModel and
    a CLIPTokenizer built from open_clip's bundled BPE file; DDPM noise schedule with
    a DDIM sampler, exactly as SD ships them.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffmem.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.vae.latent_channels,
        down_block_types=["DownEncoderBlock2D"] * len(arch.vae.channels),
        up_block_types=["UpDecoderBlock2D"] * len(arch.vae.channels),
        block_out_channels=list(arch.vae.channels), layers_per_block=arch.vae.layers_per_block,
        norm_num_groups=arch.vae.norm_groups, sample_size=arch.resolution,
    )
    text_cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=arch.text.hidden, intermediate_size=arch.text.hidden * 4,
        num_hidden_layers=arch.text.layers, num_attention_heads=arch.text.heads,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=arch.text.hidden,
    )
    text_encoder = CLIPTextModel(text_cfg)
    unet = build_unet(arch)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_unet(arch):
    """The ``UNet2DConditionModel`` of an ``arch`` config (random weights; under
    ``torch.device("meta")`` no memory at all, e.g. to count SD's FLOPs)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=arch.resolution // 2 ** (len(arch.vae.channels) - 1),
        in_channels=arch.vae.latent_channels, out_channels=arch.vae.latent_channels,
        down_block_types=list(arch.unet.down_blocks), up_block_types=list(arch.unet.up_blocks),
        block_out_channels=list(arch.unet.channels), layers_per_block=arch.unet.layers_per_block,
        cross_attention_dim=arch.text.hidden, attention_head_dim=arch.unet.head_dim,
        norm_num_groups=arch.unet.norm_groups,
    )


def cached_pipeline(arch, path: str | Path, seed: int = 0) -> Path:
    """:func:`build_testbed_pipeline` of ``arch`` saved at ``path`` (fp32 safetensors) the first
    time, reused afterwards: the SD-shaped random pipeline (``conf/arch/sd14_shape.yaml``, ~4 GB)
    is built once per machine, not once per test run."""
    from diffmem.models.pipeline import is_pipeline_dir, save_pipeline

    path = Path(path)
    if not is_pipeline_dir(path):
        save_pipeline(build_testbed_pipeline(arch, seed=seed), path)
    return path


def pairwise_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """RMSE between every row of ``a`` [N, ...] and of ``b`` [M, ...] -> [N, M]."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2 * a @ b.T
    return (sq.clamp_min(0) / a.shape[1]).sqrt().float()


def memorisation_figures(pipe, root, manifest, n_seeds: int = 8, steps: int = 25,
                         guidance: float = 5.0, copy_rmse: float = 0.3, batch_size: int = 64,
                         seed: int = 0, n_ordinary: int = 16, n_heldout: int = 16,
                         descriptor: str | None = None, descriptor_threshold: float = 0.7) -> dict:
    """How strongly the model reproduces its training images, by canary duplication count.

    Generates ``n_seeds`` images per testbed prompt and measures pixel RMSE (images on
    [-1, 1]) to the prompt's own training image(s) and to the nearest training image.
    A generation is a *copy* when that RMSE is below ``copy_rmse``. The baseline is the
    nearest-training-image RMSE of held-out real images (what "novel" looks like).
    With ``descriptor`` (a registered feature name, e.g. ``sscd_distilled``) the same
    figures in its cosine similarity stand beside them: a *descriptor copy* is a generation
    whose most similar training image is its prompt's own, above ``descriptor_threshold``.
    """
    import pandas as pd

    from diffmem.data import load_images, to_tensor
    from diffmem.data.prompts import prompts_from_testbed
    from diffmem.sampling import encode_prompts, sample, sample_seed

    res = pipe.vae.config.sample_size
    prompts = prompts_from_testbed(manifest, n_ordinary=n_ordinary, n_heldout=n_heldout, seed=seed)
    rows = prompts.loc[prompts.index.repeat(n_seeds)].reset_index(drop=True)
    rows["k"] = list(range(n_seeds)) * len(prompts)
    seeds = [sample_seed(seed, p, k) for p, k in zip(rows["prompt_id"], rows["k"])]
    uncond = encode_prompts(pipe, [""])
    gens = []
    for i in range(0, len(rows), batch_size):
        cond = encode_prompts(pipe, rows["caption"].iloc[i:i + batch_size].tolist())
        gens.append(sample(pipe, cond, seeds[i:i + batch_size], res, steps, guidance, uncond=uncond))
    gens = torch.cat(gens).cpu() * 2 - 1
    train = manifest[manifest["split"] == "train"].drop_duplicates("file").reset_index(drop=True)
    real = to_tensor(load_images(root, train["file"], res))
    dist = pairwise_rmse(gens, real)
    rows["nn_rmse"] = dist.min(1).values.numpy()
    rows["nn_group"] = train["group"].to_numpy()[dist.argmin(1).numpy()]
    own = []
    for r, d in zip(rows.itertuples(), dist):
        mask = torch.from_numpy((train["group"] == r.group).to_numpy(copy=True)) if r.group else None
        own.append(float(d[mask].min()) if mask is not None and mask.any() else float("nan"))
    rows["own_rmse"] = own
    rows["copy"] = rows["own_rmse"] < copy_rmse
    rows["near_copy"] = rows["nn_rmse"] < copy_rmse
    held = manifest[manifest["split"] == "heldout"].drop_duplicates("file")
    held_real = to_tensor(load_images(root, held["file"], res))
    held_d = pairwise_rmse(held_real, real).min(1).values
    held_sim = None
    if descriptor is not None:
        from diffmem.features import build_extractor

        ext = build_extractor(descriptor, device="cpu")
        ref = ext((real + 1) / 2)
        sim = ext((gens + 1) / 2) @ ref.T
        groups = train["group"].to_numpy()
        rows["nn_sim"] = sim.max(1).values.numpy()
        rows["nn_sim_group"] = groups[sim.argmax(1).numpy()]
        rows["own_sim"] = [float(s[torch.from_numpy(groups == r.group)].max()) if r.group else float("nan")
                           for r, s in zip(rows.itertuples(), sim)]
        rows["sim_copy"] = (rows["nn_sim_group"] == rows["group"]) & (rows["nn_sim"] > descriptor_threshold)
        held_sim = (ext((held_real + 1) / 2) @ ref.T).max(1).values
    summary = []
    for (kind, dup), g in rows.groupby(["kind", "dup_count"], sort=True):
        summary.append({
            "kind": kind, "dup_count": int(dup), "prompts": int(g["prompt_id"].nunique()),
            "generations": len(g),
            "copy_share": float(g["copy"].mean()) if kind in ("canary", "template") else None,
            "median_own_rmse": float(g["own_rmse"].median()) if kind in ("canary", "template") else None,
            "near_copy_share": float(g["near_copy"].mean()),
            "median_nn_rmse": float(g["nn_rmse"].median()),
        })
        if descriptor is not None:
            special = kind in ("canary", "template")
            summary[-1].update({
                "sim_copy_share": float(g["sim_copy"].mean()) if special else None,
                "median_own_sim": float(g["own_sim"].median()) if special else None,
                "median_nn_sim": float(g["nn_sim"].median()), "max_nn_sim": float(g["nn_sim"].max()),
            })
    out = {
        "copy_rmse": copy_rmse, "n_seeds": n_seeds, "steps": steps, "guidance": guidance,
        "summary": summary,
        "heldout_real_nn_rmse": {"median": float(held_d.median()), "p05": float(held_d.quantile(0.05)),
                                 "share_below_copy_rmse": float((held_d < copy_rmse).float().mean())},
    }
    if descriptor is not None:
        out["descriptor"] = {"name": descriptor, "threshold": descriptor_threshold}
        out["heldout_real_nn_sim"] = {"median": float(held_sim.median()), "p95": float(held_sim.quantile(0.95)),
                                      "max": float(held_sim.max()),
                                      "share_above_threshold": float((held_sim > descriptor_threshold).float().mean())}
    out["per_generation"] = pd.DataFrame(rows).drop(columns=["target_file"]).to_dict("records")
    return out
