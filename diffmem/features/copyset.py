"""A small copy-detection set from natural photos installed packages ship, to validate descriptors.

Positives are (original, an edited copy of it), negatives (original, an edited copy of
another photo). The edits are the augmentation families of the SSCD / DISC 2021
evaluation (Pizzi et al. 2022; Douze et al. 2021): crops, down-scaling + JPEG, blur,
rotation, colour jitter, blends with another photo (mixup-like overlays), text overlays
and flips. Every photo is bundled in an installed wheel (scikit-image's, and matplotlib's
sample data; nothing is downloaded) and the set is deterministic for a seed.
``benchmarks/bench_copy_detection.py`` and ``tests/test_sscd_onnx.py`` both build their set
here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from diffmem.data.photos import natural_photos
from diffmem.errors import ConfigError

if TYPE_CHECKING:
    from diffmem.features.base import Extractor


def _crop(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    area = rng.uniform(0.4, 0.7)
    w, h = max(1, round(im.width * area**0.5)), max(1, round(im.height * area**0.5))
    x, y = rng.integers(0, im.width - w + 1), rng.integers(0, im.height - h + 1)
    return im.crop((int(x), int(y), int(x) + w, int(y) + h))


def _resize_jpeg(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    s = rng.uniform(0.3, 0.6)
    small = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=int(rng.integers(15, 40)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _blur(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 4.0))))


def _rotate(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    angle = float(rng.uniform(10, 30)) * (1 if rng.random() < 0.5 else -1)
    return im.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)


def _jitter(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enh(im).enhance(float(rng.uniform(0.6, 1.4)))
    return im


def _blend(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    return Image.blend(im, other.resize(im.size, Image.Resampling.BILINEAR), float(rng.uniform(0.2, 0.35)))


def _overlay_text(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    im = im.copy()
    draw = ImageDraw.Draw(im)
    size = max(10, im.height // 8)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    for row in range(3):
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, 5)) for _ in range(3))
        draw.text(
            (int(rng.integers(0, max(1, im.width // 4))), int(im.height * (0.2 + 0.25 * row))),
            words,
            fill=colour,
            font_size=size,
        )
    return im


def _flip(im: Image.Image, rng: np.random.Generator, other: Image.Image) -> Image.Image:
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


#: The edit families: ``name -> fn(image, rng, another photo) -> edited image``.
FAMILIES: dict[str, Callable[[Image.Image, np.random.Generator, Image.Image], Image.Image]] = {
    "crop": _crop,
    "resize_jpeg": _resize_jpeg,
    "blur": _blur,
    "rotate": _rotate,
    "colour_jitter": _jitter,
    "blend": _blend,
    "overlay_text": _overlay_text,
    "flip": _flip,
}


@dataclass
class CopySet:
    """Originals and edited copies; ``copy_source[j]`` is the original that copy ``j`` was made from."""

    names: list[str]
    originals: list[np.ndarray]
    copies: list[np.ndarray]
    copy_source: np.ndarray
    copy_family: list[str]

    def labels(self) -> np.ndarray:
        """[n_originals, n_copies] bool: True where the copy was made from the original."""
        return np.arange(len(self.originals))[:, None] == self.copy_source[None, :]


def build_copy_set(
    photos: dict[str, np.ndarray] | None = None, families: Sequence[str] = tuple(FAMILIES), seed: int = 0
) -> CopySet:
    """One copy of every photo per edit family (blends mix in the next photo), deterministic for ``seed``."""
    photos = natural_photos() if photos is None else photos
    if len(photos) < 2:
        raise ConfigError("a copy-detection set needs at least 2 photos")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown edit family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    names = list(photos)
    ims = [Image.fromarray(photos[n]) for n in names]
    rng = np.random.default_rng(seed)
    copies, source, family = [], [], []
    for i, im in enumerate(ims):
        for fam in families:
            copies.append(np.asarray(FAMILIES[fam](im, rng, ims[(i + 1) % len(ims)]).convert("RGB")))
            source.append(i)
            family.append(fam)
    return CopySet(names, [photos[n] for n in names], copies, np.asarray(source), family)


def embed_arrays(extractor: Extractor, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """float32 [N, D] descriptors of uint8 [H, W, 3] arrays of any sizes."""
    return extractor.embed_pil([Image.fromarray(a) for a in images], batch_size=batch_size).cpu().numpy()


def score_copy_set(extractor: Extractor, cs: CopySet, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarities, labels), both [n_originals * n_copies] (every original against every copy)."""
    a = embed_arrays(extractor, cs.originals, batch_size)
    b = embed_arrays(extractor, cs.copies, batch_size)
    return (a @ b.T).ravel(), cs.labels().ravel()
