"""Image preprocessing with plain torch ops (no torchvision transforms, CPU- and GPU-safe).

torch is imported by the functions that run it, so the recipes (and the uint8 steps an
ONNX descriptor uses) load without it.

All functions take a float batch ``[B, C, H, W]`` and return one. Resizing uses
``torch.nn.functional.interpolate`` with ``antialias=True`` (like torchvision's tensor
``Resize(antialias=True)`` and close to PIL's filters when downsampling).

A :class:`Preprocess` is a small, JSON-serialisable recipe (resize, optional centre
crop, normalisation); :data:`PRESETS` holds the named recipes the copy-detection
literature uses (``docs/methods.md`` section 1.1):

- ``sscd_official``: resize the short side to 288 (aspect kept), ImageNet mean/std
  (the SSCD authors' evaluation setting).
- ``dcr``: resize the short side to 256, centre-crop 224, ``Normalize(0.5, 0.5)``
  (Somepalli et al. "Diffusion Art or Digital Forgery" and Wen et al.), values in [-1, 1].
- ``nemo``: resize to 320x320 (aspect not kept), ImageNet mean/std (NeMo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("short", "square", "long", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
#: PIL's filter for each interpolation, for the uint8 resize (:meth:`Preprocess.resize_size`);
#: PIL antialiases as ``interpolate(antialias=True)`` does
PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}


def _pair(size: int | float | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, float)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_to(x: torch.Tensor, size: int | Sequence[int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize to exactly ``size`` (int or (h, w)); bicubic output is clamped to the input range."""
    import torch.nn.functional as F

    h, w = _pair(size)
    if x.shape[-2:] == (h, w):
        return x
    if interpolation in ("nearest", "area"):
        return F.interpolate(x, size=(h, w), mode=interpolation)
    out = F.interpolate(x, size=(h, w), mode=interpolation, align_corners=False, antialias=True)
    if interpolation == "bicubic":  # bicubic overshoots; PIL clamps to the pixel range
        out = out.clamp(x.amin(), x.amax())  # tensor bounds: no read back from a GPU
    return out


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to ``size``, as torchvision's ``Resize(int)``."""
    if h <= w:
        return size, max(1, int(size * w / h))
    return max(1, int(size * h / w)), size


def resize_short(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize so the short side is ``size``, keeping the aspect ratio."""
    return resize_to(x, short_side_size(x.shape[-2], x.shape[-1], int(size)), interpolation)


def long_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the long side to ``size`` (aspect kept)."""
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize_long(x: torch.Tensor, size: int, interpolation: str = "bilinear", fill: float = 0.0) -> torch.Tensor:
    """Resize so the long side is ``size`` (aspect kept), then pad to ``size`` x ``size``."""
    x = resize_to(x, long_side_size(x.shape[-2], x.shape[-1], size), interpolation)
    return center_crop(x, size, fill=fill)


def center_crop(x: torch.Tensor, size: int | Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """Centre crop to ``size`` (int or (h, w)); pads with ``fill`` where the image is smaller.

    Offsets follow torchvision: ``top = round((H - h) / 2)``.
    """
    import torch.nn.functional as F

    th, tw = _pair(size)
    h, w = x.shape[-2:]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
        h, w = x.shape[-2:]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def center_crop_array(x: np.ndarray, size: int | Sequence[int], fill: int = 0) -> np.ndarray:
    """:func:`center_crop` of an ``[H, W, C]`` array (same offsets, padding with ``fill``)."""
    th, tw = _pair(size)
    h, w = x.shape[:2]
    if h < th or w < tw:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=fill)
        h, w = x.shape[:2]
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[top : top + th, left : left + tw]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel (the constants are sent to a GPU without waiting on it)."""
    import torch

    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device, non_blocking=True)
    return (x - m) / s


def _triple(v: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3
    v = tuple(float(a) for a in v)
    if len(v) != 3:
        raise ConfigError(f"preprocessing mean/std need 1 or 3 values, got {len(v)}")
    return v


@dataclass
class Preprocess:
    """A resize -> (centre crop) -> normalise recipe applied to [0, 1] images.

    ``resize``: ``short`` (short side to ``size``, aspect kept), ``square`` (to
    ``size`` x ``size``), ``long`` (long side to ``size`` and pad), ``none``.
    """

    name: str = "custom"
    resize: str = "short"
    size: int = 288
    crop: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    fill: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"preprocess resize '{self.resize}' is not one of {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess interpolation '{self.interpolation}' is not one of {', '.join(INTERPOLATIONS)}"
            )
        self.size = int(self.size)
        self.crop = None if self.crop is None else int(self.crop)
        self.mean = _triple(self.mean)
        self.std = _triple(self.std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resize_only(x)
        if self.crop is not None:
            x = center_crop(x, self.crop, self.fill)
        return normalize(x, self.mean, self.std)

    def resize_only(self, x: torch.Tensor) -> torch.Tensor:
        """The resize step alone. Applying it twice equals applying it once, so a loader may
        resize each image ahead (images of one resized shape then batch together) and the
        full recipe, run again on the batch, leaves that step as a no-op."""
        if self.resize == "short":
            return resize_short(x, self.size, self.interpolation)
        if self.resize == "square":
            return resize_to(x, self.size, self.interpolation)
        if self.resize == "long":
            return resize_long(x, self.size, self.interpolation, self.fill)
        return x

    def resize_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) after the resize step alone (before ``long``'s padding and any crop)."""
        if self.resize == "short":
            return short_side_size(h, w, self.size)
        if self.resize == "square":
            return self.size, self.size
        if self.resize == "long":
            return long_side_size(h, w, self.size)
        return h, w

    def finish_uint8(self, x: np.ndarray) -> np.ndarray:
        """The steps after the resize, on a ``uint8 [h, w, 3]`` image already resized to
        :meth:`resize_size` (``long``'s padding, the centre crop) as the float recipe does them;
        no normalisation (a uint8 graph normalises inside)."""
        fill = int(round(self.fill * 255))
        if self.resize == "long":
            x = center_crop_array(x, self.size, fill)
        return x if self.crop is None else center_crop_array(x, self.crop, fill)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) of the output for an input of (h, w)."""
        if self.crop is not None:
            return self.crop, self.crop
        if self.resize == "long":
            return self.size, self.size
        return self.resize_size(h, w)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if not d["extra"]:
            d.pop("extra")
        return d


PRESETS: dict[str, dict[str, Any]] = {
    "sscd_official": dict(resize="short", size=288, crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "dcr": dict(resize="short", size=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "nemo": dict(resize="square", size=320, crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def get_preprocess(spec: str | Mapping[str, Any] | Preprocess) -> Preprocess:
    """A :class:`Preprocess` from a preset name, a dict of fields, or one already built.

    A dict may name a ``preset`` (or ``name`` of a preset) and override some of its fields.
    """
    if isinstance(spec, Preprocess):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(
                f"unknown preprocessing '{spec}'.{did_you_mean(spec, PRESETS)} Known: {', '.join(PRESETS)} "
                "(or a dict with resize/size/crop/mean/std)"
            )
        return Preprocess(name=spec, **PRESETS[spec])
    if isinstance(spec, Mapping):
        fields = dict(spec)
        preset = fields.pop("preset", None)
        if preset is None and fields.get("name") in PRESETS:
            preset = fields["name"]
        if preset is not None and preset not in PRESETS:
            return get_preprocess(preset)  # raises the unknown-name error
        base = dict(PRESETS[preset]) if preset is not None else {}
        base.update(fields)
        base.setdefault("name", preset if preset is not None else "custom")
        known = set(Preprocess.__dataclass_fields__)
        unknown = sorted(set(base) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return Preprocess(**base)
    raise ConfigError(f"preprocessing must be a preset name or a dict, got {type(spec).__name__}")
