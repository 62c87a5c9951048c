"""A tiny self-supervised copy-detection descriptor for the testbed (SSCD's interface).

On the testbed's small, flat synthetic images SSCD's published weights are far outside
their training distribution (``features/onnx.py`` quotes the measurements). This module
trains a small CNN with SimCLR-style contrastive learning (Chen et al. 2020: two
augmented views of each image are positives, every other image in the batch a
negative, NT-Xent loss) using the augmentations copy detection must be invariant
to (random resized crops, flips, small colour jitter, a little noise), and exports
it as TorchScript with SSCD's interface:

    module(images normalised with ImageNet mean/std, [B, 3, H, W]) -> [B, dim], L2-normalised

The module resizes its input to its training resolution itself, so it works with any
of the ``sscd`` preprocessing presets; ``sscd_official`` (ImageNet mean/std) matches
training exactly. Use it through the ``sscd`` extractor::

    module = train_copy_descriptor(images_uint8, dim=64, steps=400, seed=0)
    digest = save_copy_descriptor(module, "copydet.torchscript.pt")
    ext = build_extractor("sscd", path="copydet.torchscript.pt", sha256=digest)
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmem.errors import ConfigError
from diffmem.features.base import sha256_file
from diffmem.features.transforms import IMAGENET_MEAN, IMAGENET_STD


class CopyDescriptorNet(nn.Module):
    """Small CNN: (ImageNet-normalised) [B, 3, H, W] -> resize to ``resolution`` -> [B, dim], unit rows."""

    def __init__(self, dim: int = 64, width: int = 32, resolution: int = 32):
        super().__init__()
        self.resolution = resolution
        w = width

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, w, 1), block(w, w, 1),
            block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1),
        )
        # GeM-like pooling would be closer to SSCD; mean + max pooling keeps it simple and spatially robust
        self.head = nn.Sequential(nn.Linear(8 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.resolution or x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True)
        h = self.features(x)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.head(h), dim=1)


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float = 0.5, jitter: float = 0.15,
            noise: float = 0.02) -> torch.Tensor:
    """Random resized crop (area ``min_scale``..1, aspect 3/4..4/3), horizontal flip, brightness /
    contrast / saturation jitter and Gaussian noise on a [B, 3, H, W] batch in [0, 1]."""
    b = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device="cpu").to(dev)

    area = min_scale + (1 - min_scale) * rand(b)
    log_ratio = (rand(b) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (rand(b) * 2 - 1) * (1 - sw)
    ty = (rand(b) * 2 - 1) * (1 - sh)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = sw * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    bright = 1 + (rand(b, 1, 1, 1) * 2 - 1) * jitter
    contrast = 1 + (rand(b, 1, 1, 1) * 2 - 1) * jitter
    sat = 1 + (rand(b, 1, 1, 1) * 2 - 1) * jitter
    x = x * bright
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - gray) * sat + gray
    x = x + noise * torch.randn(x.shape, generator=gen, device="cpu").to(dev)
    return x.clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent loss over 2B unit vectors (positives: the two views of an image)."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def train_copy_descriptor(images_uint8, dim: int = 64, steps: int = 400, seed: int = 0,
                          batch_size: int = 128, lr: float = 3e-3, temperature: float = 0.1,
                          width: int = 32, min_scale: float = 0.5, device: str = "cpu",
                          num_threads: int | None = None, log_every: int = 0) -> torch.jit.ScriptModule:
    """Train a :class:`CopyDescriptorNet` on ``images_uint8`` ([N, H, W, 3] uint8, e.g. 32x32)
    contrastively and return it scripted (eval mode, on CPU), SSCD-compatible.

    ``width`` (a multiple of 8) sets the channel count; ``num_threads`` temporarily caps
    torch's CPU threads (1 is fastest on a CPU shared with other jobs). Deterministic for
    a given ``seed`` (global RNG state is left untouched).
    """
    arr = np.asarray(images_uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ConfigError(f"images_uint8 must be uint8 [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] < 2:
        raise ConfigError("train_copy_descriptor needs at least 2 images")
    if width % 8:
        raise ConfigError(f"width must be a multiple of 8, got {width}")
    if arr.shape[1] != arr.shape[2]:
        raise ConfigError(f"images must be square, got {arr.shape[1]}x{arr.shape[2]}")
    dev = torch.device(device)
    data = torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).float().div(255.0).to(dev)
    n = data.shape[0]
    batch_size = min(batch_size, n)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    try:
        net = _train(data, dim, steps, seed, batch_size, lr, temperature, width, min_scale, log_every)
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but is SSCD's format
        return torch.jit.script(net.eval().cpu())


def _train(data, dim, steps, seed, batch_size, lr, temperature, width, min_scale, log_every):
    dev = data.device
    n = data.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = CopyDescriptorNet(dim=dim, width=width, resolution=int(data.shape[-1])).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
        net.train()
        for step in range(steps):
            idx = torch.randperm(n, generator=gen)[:batch_size].to(dev)
            x = data[idx]
            z1 = net(_normalise(augment(x, gen, min_scale)))
            z2 = net(_normalise(augment(x, gen, min_scale)))
            loss = nt_xent(z1, z2, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"copydetect step {step:5d} loss {loss.item():.4f}", flush=True)
    return net


def save_copy_descriptor(module: torch.jit.ScriptModule, path: str | os.PathLike) -> str:
    """``torch.jit.save`` to ``path`` (via a temp file and rename); returns the file's SHA256,
    the value to give as ``sha256`` to the ``sscd`` extractor."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, str(tmp))
    os.replace(tmp, path)
    return sha256_file(path)
