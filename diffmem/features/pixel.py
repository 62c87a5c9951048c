"""Pixel-space descriptor: downsampled, mean-centred, L2-normalised pixels.

``x -> resize to size x size (bilinear, antialias) -> [grayscale] -> flatten ->
subtract the image's mean (one scalar over all its pixels and channels) -> L2-normalise``.

The cosine of two such descriptors is the Pearson correlation of the two
downsampled images' pixel values: 1 for identical images (and for images that differ
by a uniform brightness offset or a positive contrast scaling), lower for shifted,
cropped or different images. That makes it a cheap, model-free detector of verbatim
copies; it is not robust to crops, flips or large shifts (use SSCD for those). A
constant image has no variance: its descriptor is the zero vector (cosine 0 to all).
"""

from __future__ import annotations

import torch

from diffmem.checks import check_positive
from diffmem.device import resolve_device
from diffmem.features.base import Extractor
from diffmem.features.transforms import Preprocess

_LUMA = (0.299, 0.587, 0.114)


class PixelExtractor(Extractor):
    """Downsampled mean-centred pixels; ``dim = size * size * (1 if grayscale else 3)``."""

    family = "pixel"
    preprocess: Preprocess  # set in __init__

    def __init__(
        self,
        size: int = 16,
        grayscale: bool = False,
        center: bool = True,
        interpolation: str = "bilinear",
        device: str | torch.device = "cpu",
        name: str = "pixel",
    ) -> None:
        size = check_positive(size, "pixel size")
        self.name = name
        self.size = size
        self.grayscale = bool(grayscale)
        self.center = bool(center)
        self.device = resolve_device(device)
        self.dim = size * size * (1 if self.grayscale else 3)
        self.preprocess = Preprocess(
            name="pixel",
            resize="square",
            size=size,
            crop=None,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            interpolation=interpolation,
            extra={"grayscale": self.grayscale, "center": "image_mean" if self.center else None},
        )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if self.grayscale:
            w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(dim=1, keepdim=True)
        v = x.reshape(x.shape[0], -1)
        if self.center:
            v = v - v.mean(dim=1, keepdim=True)
        return v
