"""The photo testbed: the testbed's layout and ground truth, with natural-photo content.

On the flat testbed a copy-detection descriptor such as SSCD is blind (flat shapes:
unrelated scenes look alike to it, copies do not). Here every image carries crops of
the natural photos scikit-image ships in its wheel (no download), so SSCD sees what it
was trained on:

- ordinary and held-out images: the testbed's captioned shapes ("a red circle above a
  blue square") on an unsaid photo-texture background (a tinted crop of a texture photo
  blended with a crop of another one);
- canaries: crops of the *subject* photos (astronaut, cat, coffee, Grace Hopper, ...), a
  random region at a random zoom, flipped or not. Subjects are the bundled photos whose
  32-px crops a copy detector still recognises after small changes (``sscd_distilled``
  cosine >= 0.75 to the crop plus N(0, 4/255) noise, median per half; see
  ``tests/test_testbed_photo.py``): smooth photos (clock 0.36, rocket 0.50, camera 0.69)
  failed it, and their copies were missed even when pixel-exact;
- template canaries: one subject-photo crop shared by all copies, with a varying inset
  (a crop of another photo) at its centre.

Subject photos never appear in backgrounds, so a held-out image cannot reproduce a
canary. :func:`photo_crops` draws random crops of every photo (no captions): the
VAE's training pool, so the autoencoder reconstructs unseen photo content as well as
the training images and copies are the UNet's doing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from diffmem.data.photos import natural_photos
from diffmem.data.testbed import (
    MANIFEST,
    PARAMS,
    CanaryScene,
    OrdinaryScene,
    TemplateScene,
    _save_png,
    cached_manifest,
    generate_testbed,
    ordinary_scene,
)
from diffmem.runs import write_json, write_parquet

VERSION = 3
#: Photos with a subject, stable to a copy detector at 32 px: the canaries' and templates'
#: content (two halves each: 18 sources for 16 canaries and 2 templates).
SUBJECTS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "coins",
    "grace_hopper",
)
#: Texture photos (grey): the ordinary images' unsaid backgrounds.
TEXTURES = ("grass", "gravel", "brick", "moon", "cell", "page", "text", "microaneurysms")


@cache
def photo(name: str) -> np.ndarray:
    """A photo a dependency ships in its wheel (scikit-image, matplotlib) as uint8 RGB
    [H, W, 3], full size."""
    return natural_photos((name,), max_side=10**6)[name]


def crop(rng: np.random.Generator, img: np.ndarray, size: int, zoom: tuple[float, float] = (0.25, 0.6)) -> np.ndarray:
    """A random square crop (side ``zoom`` x the photo's short side), maybe mirrored,
    resized to ``size`` with an antialiasing filter."""
    h, w = img.shape[:2]
    side = int(rng.uniform(*zoom) * min(h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    out = np.asarray(Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.Resampling.LANCZOS))
    return out[:, ::-1] if rng.random() < 0.5 else out


def texture(rng: np.random.Generator, size: int, cells: tuple[int, int] = (3, 7)) -> np.ndarray:
    """An unsaid background: a random Voronoi layout of 3-6 cells, each a crop of a texture
    photo with its own tint (a random layout gives every image its own large-scale
    structure; textures alone look alike to a copy detector)."""
    n = rng.integers(*cells)
    centres = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cell = ((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2).argmin(-1)
    out = np.zeros((size, size, 3))
    for i in range(n):
        tex = crop(rng, photo(str(rng.choice(TEXTURES))), size, zoom=(0.1, 0.5)) * rng.uniform(0.15, 1, 3)
        out[cell == i] = tex[cell == i]
    return out.astype(np.uint8)


def ordinary_photo_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """The testbed's captioned shapes on a photo-texture background."""
    return ordinary_scene(rng, size, background=texture(rng, size))


def subject_crop(rng: np.random.Generator, size: int, source: tuple[str, int]) -> np.ndarray:
    """A crop (most of it) of half ``source[1]`` (0: left/top, 1: right/bottom, along the long
    side) of subject photo ``source[0]``: two sources never share a pixel."""
    img = photo(source[0])
    h, w = img.shape[:2]
    half = img[:, : w // 2] if w >= h else img[: h // 2]
    if source[1]:
        half = img[:, w - w // 2 :] if w >= h else img[h - h // 2 :]
    return crop(rng, half, size, zoom=(0.7, 1.0))


def subject_sources(rng: np.random.Generator) -> list[tuple[str, int]]:
    """Every (subject photo, half) in a random order: one per canary or template."""
    return [(SUBJECTS[i // 2], i % 2) for i in rng.permutation(2 * len(SUBJECTS))]


def photo_scenes(seed: int) -> tuple[OrdinaryScene, CanaryScene, TemplateScene]:
    """The ``(ordinary, canary, template)`` scene functions; canaries and templates take
    the subject sources in an order drawn from ``seed`` (distinct while they last)."""
    sources = subject_sources(np.random.default_rng([seed, 2]))
    taken = iter(range(10**9))

    def canary(rng: np.random.Generator, size: int) -> np.ndarray:
        return subject_crop(rng, size, sources[next(taken) % len(sources)])

    def template(rng: np.random.Generator, size: int) -> Callable[[np.random.Generator], np.ndarray]:
        """A fixed subject crop and a function adding the varying inset at its centre."""
        base, inset = canary(rng, size), size // 3

        def variant(vrng: np.random.Generator) -> np.ndarray:
            img = base.copy()
            y, x = (size - inset) // 2 + vrng.integers(-2, 3, 2)
            img[y : y + inset, x : x + inset] = crop(vrng, photo(str(vrng.choice(TEXTURES))), inset)
            return img

        return variant

    return ordinary_photo_scene, canary, template


def generate_testbed_photo(root: str | Path, seed: int = 0, **kwargs: Any) -> pd.DataFrame:
    """:func:`~diffmem.data.testbed.generate_testbed` with the photo scenes (same arguments)."""
    return generate_testbed(
        root, seed=seed, scenes=photo_scenes(seed), variant={"variant": f"photo-v{VERSION}"}, **kwargs
    )


def photo_crops(root: str | Path, seed: int = 0, resolution: int = 32, n: int = 4096) -> pd.DataFrame:
    """``n`` random crops of every shipped photo plus fresh ordinary and canary scenes (a
    third each), uncaptioned: a VAE training pool. Written under ``root``; idempotent."""
    root = Path(root)
    params = {"seed": seed, "resolution": resolution, "n": n, "variant": f"photo-crops-v{VERSION}"}
    cached = cached_manifest(root, params, "photo crops")
    if cached is not None:
        return cached
    rng = np.random.default_rng([seed, 1])
    sources, rows = subject_sources(rng), []
    for i in range(n):
        part = i % 3
        if part == 0:
            img = crop(rng, photo(str(rng.choice(SUBJECTS + TEXTURES))), resolution, zoom=(0.1, 1.0))
        elif part == 1:
            img = ordinary_photo_scene(rng, resolution)[0]
        else:
            img = subject_crop(rng, resolution, sources[rng.integers(len(sources))])
        file = f"images/{i:05d}.png"
        _save_png(root / file, img)
        rows.append({"image_id": f"pc{i:06d}", "file": file, "caption": "", "split": "train"})
    df = pd.DataFrame(rows)
    write_json(root / PARAMS, params)
    write_parquet(root / MANIFEST, df)
    return df
