"""The natural photos installed dependencies ship in their wheels (nothing is downloaded):
scikit-image's ``skimage.data`` and matplotlib's sample data. The photo testbed
(:mod:`diffmem.data.testbed_photo`) draws its content from them and the copy-detection set
(:mod:`diffmem.features.copyset`) its originals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO, cast

import numpy as np
from PIL import Image

from diffmem.errors import ConfigError

#: ``skimage.data`` photographs (and scans) bundled in the wheel; ``stereo_motorcycle``
#: contributes its left view only (the right one is a near-copy of it).
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "brick",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "page",
    "text",
    "clock",
    "cell",
    "microaneurysms",
    "stereo_motorcycle",
)
#: Photos other declared dependencies ship: Grace Hopper's US Navy portrait (public domain)
#: in matplotlib's sample data.
OTHER_PHOTOS = ("grace_hopper",)


def _load_photo(name: str) -> np.ndarray:
    """One photo as its package ships it (any channels, full size)."""
    if name in OTHER_PHOTOS:
        import matplotlib.cbook

        sample = matplotlib.cbook.get_sample_data(f"{name}.jpg")  # a file object (asfileobj=True)
        return np.asarray(Image.open(cast("IO[bytes]", sample)))
    import skimage.data

    arr = getattr(skimage.data, name)()
    return arr[0] if isinstance(arr, tuple) else arr


def natural_photos(names: Sequence[str] = PHOTOS, max_side: int = 512) -> dict[str, np.ndarray]:
    """``{name: uint8 [H, W, 3]}`` of the bundled photos (scikit-image's by default, or
    :data:`OTHER_PHOTOS`), grey ones as RGB, the long side down-scaled to at most ``max_side``
    (aspect kept)."""
    out = {}
    for name in names:
        if name not in PHOTOS and name not in OTHER_PHOTOS:
            raise ConfigError(f"unknown photo '{name}'; known: {', '.join(PHOTOS + OTHER_PHOTOS)}")
        im = Image.fromarray(np.asarray(_load_photo(name), dtype=np.uint8)).convert("RGB")
        scale = max_side / max(im.size)
        if scale < 1:
            im = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC
            )
        out[name] = np.asarray(im)
    return out
