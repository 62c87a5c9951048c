"""The training engine: the diffusion loss, a resumable optimisation loop, and the training of
a text-to-image model into a claimed run dir (what the ``train`` stage runs).

Noise-prediction loss with classifier-free-guidance caption dropout, optional EMA,
AdamW, checkpoints that make a killed run resume exactly (every step's batch, noise and
timesteps come from ``(seed, phase, step)``, so there is no RNG state to lose), a
progress bar and a loss log. From scratch it first trains the VAE, then the UNet on the
VAE's latents with the text encoder frozen (as SD does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from diffmem import distributed as dist
from diffmem.checks import check_positive
from diffmem.data import load_dataset, load_images, to_tensor
from diffmem.device import configure_torch
from diffmem.errors import ConfigError
from diffmem.loading import load_model, model_precision
from diffmem.models import save_pipeline
from diffmem.models.pipeline import resolve_dtype, staged_dir
from diffmem.runs import write_json, write_parquet
from diffmem.sampling import encode_prompts

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from diffusers.training_utils import EMAModel

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"  # a run dir's resume state (not an output)
TRAIN_LOG = "train_log.parquet"  # the mean loss per logged step of a training run
MEMORISATION_JSON = "memorisation.json"  # ``evaluate``'s figures, beside the published model


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, phase, step)."""
    key = int(np.random.SeedSequence([int(seed), sum(map(ord, phase)), int(step)]).generate_state(1)[0])
    return torch.Generator().manual_seed(key)


def _save_state(
    ckpt_root: Path,
    step: int,
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ema: EMAModel | None,
    losses: list,
    running: list,
    keep: int,
) -> None:
    from safetensors.torch import save_file

    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".step-{step:07d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / "model.safetensors")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    if ema is not None:
        torch.save(ema.state_dict(), tmp / "ema.pt")
    # ``running``: losses since the last log entry, so a resumed run logs the same means
    write_json(tmp / "state.json", {"step": step, "losses": losses, "running": running})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)


def _read_checkpoint(path: Path, files: Sequence[str]) -> dict:
    """``files`` of checkpoint ``path`` read whole, nothing applied yet (tensors with
    ``weights_only``: a pickle is refused, never run); ``ValueError`` naming the first
    unreadable file, or a ``state.json`` that is not this checkpoint's."""
    from safetensors.torch import load_file

    def tensors(f: Path) -> dict[str, Any]:
        with warnings.catch_warnings():  # torch's note on a foreign pickle protocol: the error says it
            warnings.filterwarnings("ignore", "Detected pickle protocol")
            return torch.load(f, weights_only=True)

    readers: dict[str, Callable[[Path], Any]] = {
        "state.json": lambda f: json.loads(f.read_text()),
        "model.safetensors": load_file,
        "optimizer.pt": tensors,
        "ema.pt": tensors,
    }
    out = {}
    for name in files:
        try:
            out[name] = readers[name](path / name)
        except Exception as err:  # json, safetensors and torch raise many types for a damaged file
            raise ValueError(f"{path / name} is unreadable ({type(err).__name__})") from err
    state = out["state.json"]
    step = state.get("step") if isinstance(state, dict) else None
    if not (isinstance(step, int) and path.name == f"step-{step:07d}" and isinstance(state.get("losses"), list)):
        raise ValueError(f"{path / 'state.json'} is not the state of {path.name}")
    return out


def _latest_state(
    ckpt_root: Path, phase: str, files: Sequence[str] = ("state.json",)
) -> tuple[Path, dict[str, Any]] | None:
    """``(path, its files read)`` of the newest checkpoint under ``ckpt_root`` whose ``files``
    all read, or ``None``. A damaged newer one (a kill mid-copy, a bad disk, a planted pickle)
    is removed with a one-line warning naming the file and what is used instead, so a resume
    never sticks on it."""
    damaged = []
    found = None
    for path in sorted(ckpt_root.glob("step-*"), reverse=True):
        try:
            found = path, _read_checkpoint(path, files)
            break
        except ValueError as err:
            damaged.append((path, err))
    instead = f"resuming from {found[0].name} instead" if found else "starting from scratch"
    for path, why in damaged if dist.is_main() else ():  # rank 0 alone writes the run dir
        log.warning("%s: checkpoint %s; %s", phase, why, instead)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def _logged_losses(ckpt_root: Path, phase: str) -> list[dict]:
    latest = _latest_state(ckpt_root, phase)
    return latest[1]["state.json"]["losses"] if latest else []


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's ``mixed_precision`` for a pipeline that runs in ``dtype``: training keeps fp32
    trainables (master weights) and autocasts to ``dtype`` (fp16 adds a grad scaler)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(mixed: str = "no", device: torch.device | None = None) -> Accelerator:
    """An ``Accelerator`` with ``mixed`` precision on ``device`` (default: CUDA when present).

    accelerate keeps one process-wide state; a run that asks for another precision than the
    last one (a test session switching fp32 and bf16) resets it first.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state()
    cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    return Accelerator(cpu=cpu, mixed_precision=mixed)


@contextlib.contextmanager
def norms_in_fp32(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, group and layer norms take contiguous inputs in their weights' dtype.

    CUDA's autocast runs normalisations in fp32; the CPU's leaves them alone, so bf16
    activations (channels-last after mkldnn convolutions) meet fp32 master weights, and
    PyTorch's channels-last GroupNorm backward on the CPU crashes when the norm's own weights
    are frozen (a masked fine-tune). This gives the CPU CUDA's policy in contiguous layout.
    """

    def hook(
        norm: torch.nn.GroupNorm | torch.nn.LayerNorm, inputs: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...]:
        dtype = norm.weight.dtype if norm.weight is not None else inputs[0].dtype
        return (inputs[0].to(dtype).contiguous(), *inputs[1:])

    handles = [
        m.register_forward_pre_hook(hook)
        for m in module.modules()
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _lr_factor(step: int, steps: int, warmup: int, decay_from: int | None) -> float:
    factor = min(1.0, (step + 1) / max(1, warmup))
    if decay_from is not None and step >= decay_from:
        factor *= (steps - step) / max(1, steps - decay_from)
    return factor


def fit(
    module: torch.nn.Module,
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    *,
    steps: int,
    lr: float,
    seed: int,
    phase: str,
    ckpt_dir: Path,
    ckpt_every: int = 200,
    keep: int = 2,
    warmup: int = 0,
    decay_from: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    ema_decay: float | None = None,
    log_every: int = 10,
    mixed: str = "no",
    gradient_accumulation_steps: int = 1,
) -> list[dict]:
    """Optimise ``module``'s trainable parameters for ``steps`` steps; resumable.

    ``loss_fn(step, generator)`` returns the loss of one micro-batch. Each optimiser step
    averages ``gradient_accumulation_steps`` micro-batches (micro-batch ``j`` of step ``s``
    draws from the generator of ``s * gradient_accumulation_steps + j``). The trainables
    should be fp32 (master weights): the forward runs under accelerate's autocast to
    ``mixed`` (``no``/``bf16``/``fp16``; fp16 scales the loss). The learning rate warms up
    linearly over ``warmup`` steps and, from ``decay_from`` on, decays linearly to 0 at
    ``steps``. Returns the loss log.

    In a data-parallel job (:mod:`diffmem.distributed`) ``loss_fn`` returns this rank's share
    of the global batch's loss (:func:`diffmem.distributed.batch_mean`); the gradients are
    averaged over the ranks after each step's micro-batches (DDP's all-reduce, done here
    because the loss functions call the model through its pipeline, not a DDP wrapper), so
    every rank takes the same optimiser step, and rank 0 alone writes checkpoints.
    """
    accum = check_positive(gradient_accumulation_steps, "gradient_accumulation_steps")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"{phase}: nothing to train (no parameter requires grad)")
    dist.init()  # before accelerate's: the job's process group, with the barrier timeout
    acc = make_accelerator(mixed, params[0].device)
    opt = acc.prepare_optimizer(torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    ema = None
    if ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=ema_decay)
    start, losses, running = 0, [], []
    files = ("state.json", "model.safetensors", "optimizer.pt") + (("ema.pt",) if ema is not None else ())
    latest = _latest_state(ckpt_dir, phase, files)
    if latest is not None:
        path, saved = latest
        module.load_state_dict(saved["model.safetensors"])
        opt.load_state_dict(saved["optimizer.pt"])
        if ema is not None:
            ema.load_state_dict(saved["ema.pt"])
        state = saved["state.json"]
        start, losses, running = state["step"], state["losses"], state.get("running", [])
        log.info("%s: resuming from step %d", phase, start)
    cpu_mixed = mixed != "no" and acc.device.type == "cpu"
    module.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=phase, mininterval=2, disable=not dist.is_main())
    # the norm hooks stay for the backward too: gradient checkpointing reruns the forward there
    with norms_in_fp32(module) if cpu_mixed else contextlib.nullcontext():
        for step in bar:
            for group in opt.param_groups:  # a pure function of the step, so resume is exact
                group["lr"] = lr * _lr_factor(step, steps, warmup, decay_from)
            loss: torch.Tensor | float = 0.0
            for micro in range(step * accum, (step + 1) * accum):
                with acc.autocast():
                    part = loss_fn(step, step_generator(seed, phase, micro)) / accum
                acc.backward(part)
                loss += part.detach().float()
            dist.average_gradients(params)
            if grad_clip:
                acc.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            running.append(dist.mean_over_ranks(float(loss)))
            if (step + 1) % log_every == 0 or step + 1 == steps:
                losses.append({"phase": phase, "step": step + 1, "loss": float(np.mean(running))})
                bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
                running = []
            if ((step + 1) % ckpt_every == 0 or step + 1 == steps) and dist.is_main():
                _save_state(ckpt_dir, step + 1, module, opt, ema, losses, running, keep)
    if ema is not None:
        ema.copy_to(params)
    module.eval()
    return losses


def drop_checkpoints(run_dir: str | Path, keep: bool) -> None:
    """After ``_SUCCESS``: remove ``<run dir>/checkpoints`` (only a resume needs them; a full SD
    fine-tune keeps ~10 GB there) unless ``keep`` (``keep_checkpoints=true``)."""
    ckpt = Path(run_dir) / CHECKPOINTS
    if keep or not ckpt.is_dir():
        return
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    shutil.rmtree(ckpt)
    log.info("removed %s (%.2f GB; keep_checkpoints=true keeps them)", ckpt, size / 1e9)


def fit_settings(cfg: DictConfig, mixed: str) -> dict:
    """The :func:`fit` settings of a training config (``steps``, ``lr``, ``ckpt_every``,
    ``warmup``, ``gradient_accumulation_steps``): train's ``vae``/``unet`` and the mitigations'."""
    return dict(
        steps=int(cfg.steps),
        lr=float(cfg.lr),
        ckpt_every=int(cfg.ckpt_every),
        warmup=int(cfg.get("warmup", 0)),
        gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps", 1)),
        mixed=mixed,
    )


def fit_items(cfg: DictConfig, rank: int, world: int) -> int:
    """The training rows rank ``rank`` of ``world`` computes in a :func:`fit` per ``cfg``."""
    per_step = dist.batch_rows(int(cfg.batch_size), rank, world)
    return (per_step.stop - per_step.start) * int(cfg.steps) * int(cfg.get("gradient_accumulation_steps", 1))


def prepare_trainables(module: ModelMixin, gradient_checkpointing: bool = False) -> None:
    """fp32 master copies of ``module``'s trainable parameters (the frozen rest keeps the
    pipeline's dtype, as diffusers' training scripts do), and gradient checkpointing if asked."""
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if gradient_checkpointing:
        module.enable_gradient_checkpointing()


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, cfg: DictConfig, seed: int, ckpt_dir: Path, mixed: str = "no"
) -> list[dict]:
    """Reconstruction + small KL; afterwards the latent scaling factor is set to 1/std."""
    n = images.shape[0]

    def loss_fn(
        step: int, g: torch.Generator
    ) -> torch.Tensor:  # the global batch's draws; this rank's rows (all of them in one process)
        rows = dist.batch_rows(cfg.batch_size)
        x = images[torch.randint(n, (cfg.batch_size,), generator=g)[rows]].to(vae.device)
        post = vae.encode(x).latent_dist
        noise = torch.randn((cfg.batch_size, *post.mean.shape[1:]), generator=g)[rows]
        rec = vae.decode(post.mean + post.std * noise.to(x.device)).sample
        return dist.batch_mse(rec, x) + cfg.kl_weight * dist.batch_mean(post.kl())

    vae.requires_grad_(True)
    losses = fit(
        vae,
        loss_fn,
        seed=seed,
        phase="vae",
        ckpt_dir=ckpt_dir,
        decay_from=cfg.get("decay_from"),
        **fit_settings(cfg, mixed),
    )
    vae.requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256].to(vae.device)).latent_dist.mean for i in range(0, n, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return losses


@torch.no_grad()
def encode_latents(
    vae: AutoencoderKL, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 8
) -> torch.Tensor:
    """Scaled latents (posterior mean x scaling factor; float32, CPU) of images in [-1, 1].

    ``images`` is ``[N, 3, H, W]`` (encoded ``batch_size`` at a time) or an iterable of such
    batches, e.g. loaded from disk one batch at a time so that at most one batch of images
    is in memory (:func:`encode_files`).
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    out = [vae.encode(b.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu() for b in batches]
    return torch.cat(out) * vae.config["scaling_factor"]


def encode_files(
    vae: AutoencoderKL, root: str | Path, files: Sequence[str], resolution: int, batch_size: int = 8
) -> torch.Tensor:
    """:func:`encode_latents` of image files, streamed: read ``batch_size`` files at a time."""
    batches = (
        to_tensor(load_images(root, files[i : i + batch_size], resolution)) for i in range(0, len(files), batch_size)
    )
    return encode_latents(vae, batches)


def noised(
    noise_sched: DDPMScheduler, x0: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, target)``: fresh noise and uniform timesteps from ``g``; the target is the
    noise (the velocity for v-prediction models).

    ``g`` is a CPU generator (the same draws on any device); the noise and timesteps are
    moved to ``x0``'s device and the noise cast to ``x0``'s dtype, so half-precision latents
    give a half-precision ``x_t`` for a half-precision UNet.
    """
    noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
    t = cast(
        "torch.IntTensor",
        torch.randint(0, noise_sched.config["num_train_timesteps"], (x0.shape[0],), generator=g).to(x0.device),
    )
    xt = noise_sched.add_noise(x0, noise, t)
    target = (
        noise_sched.get_velocity(x0, noise, t) if noise_sched.config["prediction_type"] == "v_prediction" else noise
    )
    return xt, t, target


def diffusion_loss(
    unet: UNet2DConditionModel,
    noise_sched: DDPMScheduler,
    x0: torch.Tensor,
    cond: torch.Tensor,
    g: torch.Generator,
    split: bool = False,
) -> torch.Tensor:
    """The noise-prediction loss at fresh noise and uniform timesteps drawn from ``g``
    (:func:`noised`); shared by training, trigger search and the mitigations. With ``split``
    (a :func:`fit` loss), the UNet sees only this rank's rows of the batch and the loss is this
    rank's share (:func:`diffmem.distributed.batch_mse`); the same as without in one process."""
    xt, t, target = noised(noise_sched, x0, g)
    if not split:
        return torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample.float(), target.float())
    rows = dist.batch_rows(len(x0))
    return dist.batch_mse(
        unet(xt[rows], t[rows], encoder_hidden_states=cond[rows]).sample.float(), target[rows].float()
    )


def train_unet(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    cond: torch.Tensor,
    cond_index: np.ndarray,
    cfg: DictConfig,
    seed: int,
    ckpt_dir: Path,
    mixed: str = "no",
) -> list[dict]:
    """Noise-prediction training; caption dropout replaces ``c`` with ``c0`` with prob ``p``."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, n = pipe.unet, latents.shape[0]
    uncond = encode_prompts(pipe, [""])[0]
    index = torch.as_tensor(np.array(cond_index))

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        x0 = latents[idx].to(unet.device)
        c = cond[index[idx]].to(unet.device)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        c[drop.to(unet.device)] = uncond
        return diffusion_loss(unet, noise_sched, x0, c, g, split=True)

    unet.requires_grad_(True)
    prepare_trainables(unet, bool(cfg.get("gradient_checkpointing", False)))
    losses = fit(
        unet,
        loss_fn,
        seed=seed,
        phase="unet",
        ckpt_dir=ckpt_dir,
        decay_from=cfg.get("decay_from"),
        ema_decay=cfg.ema_decay,
        **fit_settings(cfg, mixed),
    )
    unet.requires_grad_(False)
    return losses


def train_pipeline(
    cfg: DictConfig, run_dir: Path, root: Path, manifest: pd.DataFrame, evaluate: Callable[..., dict] | None = None
) -> Path:
    """Train per a ``train`` config into the claimed ``run_dir`` (the VAE, then the UNet, each
    resuming from its checkpoints) on the training rows of ``manifest``; returns the model dir.

    Writes ``model/`` (diffusers format) and ``train_log.parquet``. ``evaluate(model, data root,
    manifest) -> figures`` (the train stage's, a hook so that the engine imports no metric)
    measures the published model into ``model/memorisation.json``.
    """
    torch.manual_seed(cfg.seed)
    device = configure_torch(cfg)
    train_rows = training_rows(root, manifest)
    images = to_tensor(load_images(root, train_rows["file"], cfg.resolution))

    if cfg.get("arch") is not None:
        from diffmem.models.testbed import build_testbed_pipeline

        pipe = build_testbed_pipeline(cfg.arch, seed=cfg.seed)
    else:
        pipe = load_model(cfg.model, "cpu", precision="fp32")  # fp32 master weights
    if cfg.vae.get("path"):  # a pretrained VAE (frozen with vae.steps: 0), e.g. one shared by many runs
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(cfg.vae.path, use_safetensors=True)
        if pipe.vae.config.latent_channels != pipe.unet.config.in_channels:
            raise ConfigError(
                f"vae.path: {cfg.vae.path} has {pipe.vae.config.latent_channels} latent "
                f"channels, the UNet takes {pipe.unet.config.in_channels}"
            )
    pipe.to(device)
    for m in (pipe.vae, pipe.text_encoder, pipe.unet):
        m.requires_grad_(False)
    mixed = mixed_precision(resolve_dtype(model_precision(cfg.get("model") or {}), device))  # from scratch: fp32

    vae_dir = run_dir / "vae"
    if cfg.vae.steps > 0:
        if not all((vae_dir / f).exists() for f in ("config.json", "diffusion_pytorch_model.safetensors")):
            vae_images = images
            if cfg.vae.get("data"):  # its own pool (e.g. random photo crops), so the VAE does not memorise
                vae_root, vae_rows = load_dataset(cfg.vae.data)
                vae_images = to_tensor(load_images(vae_root, vae_rows["file"], cfg.resolution))
            train_vae(pipe.vae, vae_images, cfg.vae, cfg.seed, run_dir / CHECKPOINTS / "vae", mixed)
            if dist.is_main():  # rank 0 alone writes the run dir
                with staged_dir(vae_dir) as tmp:
                    pipe.vae.save_pretrained(tmp, safe_serialization=True)
        dist.barrier("train: VAE saved")
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).to(device)
        pipe.vae.requires_grad_(False)

    latents = encode_latents(pipe.vae, images)
    captions = train_rows["caption"].astype(str).tolist()
    unique = sorted(set(captions))
    cond = encode_prompts(pipe, unique).cpu()
    cond_index = pd.Series(range(len(unique)), index=unique).loc[captions].to_numpy()
    train_unet(pipe, latents, cond, cond_index, cfg.unet, cfg.seed, run_dir / CHECKPOINTS / "unet", mixed)
    if not dist.is_main():  # rank 0 publishes
        return run_dir / "model"
    losses = [row for phase in ("vae", "unet") for row in _logged_losses(run_dir / CHECKPOINTS / phase, phase)]

    write_parquet(run_dir / TRAIN_LOG, pd.DataFrame(losses))
    model_dir = save_pipeline(pipe, run_dir / "model", dtype=cfg.save_dtype)
    if evaluate is not None:
        saved = load_model(model_dir, device)  # measure what was published
        write_json(model_dir / MEMORISATION_JSON, evaluate(saved, root, manifest))
    return model_dir


def training_rows(root: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """The rows a model trains on (``split == train`` where the data has splits)."""
    rows = manifest[manifest["split"] == "train"] if "split" in manifest else manifest
    if rows.empty:
        raise ConfigError(f"{root}: the dataset has no training rows")
    return rows
