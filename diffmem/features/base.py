"""The extractor interface shared by every descriptor, and small helpers.

torch is imported by the methods that run it: a descriptor without torch (ONNX) and the
embed stage's uint8 path load and run without it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffmem.errors import DataError

if TYPE_CHECKING:
    import torch

    from diffmem.features.transforms import Preprocess


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$DIFFMEM_CACHE`` or ``~/.cache/diffmem`` (the same default as ``conf/paths``)."""
    env = os.environ.get("DIFFMEM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffmem"


def pil_to_tensor(images: Iterable) -> list[torch.Tensor]:
    """PIL images -> list of float [3, H, W] tensors in [0, 1] (converted to RGB)."""
    import torch

    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))
    return out


class Extractor:
    """Base class of every descriptor: images -> float32 [B, D], L2-normalised rows.

    Subclasses set ``name``, ``dim``, ``device`` and ``preprocess`` (a
    :class:`~diffmem.features.transforms.Preprocess` or None) and implement
    ``_embed(x)`` which gets the validated [0, 1] float batch already on ``device``
    and returns [B, D] (any scale: rows are L2-normalised here).
    """

    name: str = "extractor"
    family: str = "extractor"
    dim: int = 0
    device: torch.device | str = "cpu"  # subclasses set a torch.device
    #: False for a descriptor that runs without torch (it takes ``threads``; the embed stage
    #: then never imports torch: :func:`diffmem.features.build_stage_extractor`)
    needs_torch = True
    preprocess: Preprocess | None = None

    # -- to implement ---------------------------------------------------------
    @classmethod
    def check_config(cls, fields: dict) -> None:
        """Refuse an unusable config cheaply (nothing loaded), so a pipeline that embeds late
        (audit) can refuse before its first step."""

    def _embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _info_extra(self) -> dict[str, Any]:
        return {}

    def weights_info(self) -> dict[str, Any] | None:
        """``{"path", "sha256", ...}`` of the weights file, or None when there is none."""
        return None

    # -- public ---------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """JSON-serialisable description: name, dim, preprocessing, weights (path, sha256)."""
        pre = self.preprocess.to_dict() if self.preprocess is not None else None
        out = {
            "name": self.name,
            "family": self.family,
            "dim": int(self.dim),
            "normalised": "l2",
            "preprocessing": pre,
            "weights": self.weights_info(),
        }
        out.update(self._info_extra())
        return out

    @staticmethod
    def _check_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
        import torch

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise DataError(f"images must be a tensor [B, 3, H, W], got {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"images must be [B, 3, H, W] (or [B, 1, H, W]), got {list(images.shape)}")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        elif not images.is_floating_point():
            raise DataError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
        else:
            images = images.float()
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise DataError(
                    f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                    "(convert [-1, 1] model outputs with (x + 1) / 2)"
                )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors of a batch: float [B, 3, H, W] in [0, 1] (uint8 accepted) ->
        float32 [B, D] on ``self.device``, rows L2-normalised."""
        return self.embed_valid(self._check_images(images))

    def embed_valid(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors of a float batch ``[B, 3, H, W]`` already known to be in [0, 1] (a
        loader's, on any device): no check reads it back to the host, so on a GPU the call
        only queues work and a loader can prepare the next batch meanwhile."""
        import torch
        import torch.nn.functional as F

        if x.shape[0] == 0:
            return torch.zeros(0, self.dim, device=self.device)
        with torch.no_grad():
            out = self._embed(x.to(self.device, non_blocking=True))
            out = out.float().reshape(out.shape[0], -1)
            if out.shape != (x.shape[0], self.dim):
                raise DataError(f"{self.name}: model returned {list(out.shape)}, expected [{x.shape[0]}, {self.dim}]")
            return F.normalize(out, dim=1)

    def embed_pil(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        """Descriptors of PIL images (any sizes; same-size runs are batched together)."""
        import torch

        tensors = pil_to_tensor(images)
        if not tensors:
            return torch.zeros(0, self.dim, device=self.device)
        outs, i = [], 0
        while i < len(tensors):
            j = i + 1
            while j < len(tensors) and j - i < batch_size and tensors[j].shape == tensors[i].shape:
                j += 1
            outs.append(self(torch.stack(tensors[i:j])))
            i = j
        return torch.cat(outs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={str(self.device)!r})"
