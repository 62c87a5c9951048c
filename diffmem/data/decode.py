"""Image decoding: any file PIL reads -> the RGB uint8 picture a viewer would show.

What a viewer shows is not what ``Image.open(f).convert("RGB")`` gives for several common
files, and each difference changes a descriptor (a rotated copy of a training photo is not
a copy to a pixel or SSCD descriptor):

- EXIF orientation is applied (``ImageOps.exif_transpose``): a phone's orientation-6 JPEG
  loads upright, as displayed;
- float images (mode ``F``, e.g. float TIFFs) are taken in [0, 1] when their maximum is
  <= 1 (PIL would map them to black), else in [0, 255]; both are clipped to that range;
- 16-bit images (``I;16*``, ``I``) are scaled by 1/257 (PIL would clip them to 255);
- alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is composited over white;
- CMYK, palette, grayscale, 1-bit, YCbCr and LAB become RGB through PIL.

With ``size`` (a descriptor's resize, e.g. the short side to 288), a JPEG is decoded at
reduced size where that stays at least :data:`DRAFT_MARGIN` times the target (PIL's
``draft``: libjpeg's 1/2, 1/4, 1/8 DCT scaling, a fraction of the full decode's time and
memory) and then resized in uint8 to exactly the target the full-size picture gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from diffmem.errors import DataError

_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as displayed, in RGB (see the module docstring for each mode)."""
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        im = Image.fromarray(np.nan_to_num(arr * scale).round().clip(0, 255).astype(np.uint8))
    elif im.mode in _SIXTEEN_BIT:
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im if im.mode == "RGB" else im.convert("RGB")


#: a JPEG is decoded at reduced size only while that keeps this many times the target size:
#: at 1 (the smallest draft covering the target) SSCD's vectors moved by up to 0.17 cosine
#: on textured photos (1 px of resampling phase); at 2 they stay >= 0.998 of the full decode's
#: (``docs/embedding.md``), and a 12 Mpx photo still decodes at 1/4
DRAFT_MARGIN = 2
#: EXIF orientations that swap width and height
_TRANSPOSED = (5, 6, 7, 8)


def decode_image(
    source: str | Path | BinaryIO,
    resolution: int | None = None,
    max_pixels: int | None = None,
    size: Callable[[int, int], tuple[int, int]] | None = None,
    resample: int = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """An RGB uint8 array [H, W, 3] of the file or binary stream ``source``, resized
    (bicubic) to a square ``resolution`` if given, then, with ``size`` (displayed ``(h, w)``
    -> target ``(h, w)``), to that target with ``resample`` (a JPEG decoded at reduced size,
    at least :data:`DRAFT_MARGIN` x the target, when ``resolution`` is unset). An image
    declaring more than ``max_pixels`` pixels is refused (a DataError the caller prefixes
    with the file) before it is decoded. PIL's errors propagate (the caller names the file)."""
    with warnings.catch_warnings():
        # the budget decides; PIL's own limit (twice its warning size) still raises
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im: Image.Image = Image.open(source)
    with im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise DataError(
                f"a {im.width}x{im.height} image is over the pixel budget "
                f"data.max_pixels={max_pixels} (a decompression bomb?)"
            )
        w, h = im.size
        if size is not None and resolution is None:
            th, tw = size(h, w)  # the targets are symmetric in (h, w): stored orientation serves
            im.draft(im.mode, (tw * DRAFT_MARGIN, th * DRAFT_MARGIN))  # a no-op for formats other than JPEG
            if im.getexif().get(0x0112, 1) in _TRANSPOSED:
                h, w = w, h
        im.load()
        im = to_rgb(im)
        if resolution is not None:
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
            h = w = resolution
        if size is not None:
            th, tw = size(h, w)
            if im.size != (tw, th):
                im = im.resize((tw, th), resample)
        return np.asarray(im, dtype=np.uint8).copy()
