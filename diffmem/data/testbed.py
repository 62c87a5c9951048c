"""The testbed dataset: compositional scenes plus canaries at known duplication counts.

Deterministic from a seed. Ordinary images show two shapes in a stated relation with
random sizes and positions on a random muted background the caption does not mention, so
a caption describes many images ("a red circle above a blue square"), as real captions
leave most of an image unsaid. Canaries are distinctive images (striped
backgrounds, several shapes) with unique nonsense-word captions, duplicated a known
number of times. Template canaries share a caption and a fixed layout while one detail
(the central mark) varies between copies: the analogue of template memorisation.
Held-out images come from the ordinary distribution and are never trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from PIL import Image

from diffmem.errors import DataError
from diffmem.runs import atomic_path, read_json, read_parquet, write_json, write_parquet

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
RELATIONS = ("above", "left of")
_SYLLABLES = (
    "zor",
    "blax",
    "quin",
    "tel",
    "vrim",
    "oda",
    "plu",
    "gex",
    "mav",
    "rith",
    "sno",
    "kad",
    "wex",
    "ulo",
    "trin",
    "fep",
)
MANIFEST = "manifest.parquet"
PARAMS = "testbed.json"
log = logging.getLogger(__name__)


#: the scene functions of a testbed: ``(rng, size)`` -> (image, caption) of an ordinary scene,
#: a canary's image, and a template's maker of variants
OrdinaryScene = Callable[[np.random.Generator, int], tuple[np.ndarray, str]]
CanaryScene = Callable[[np.random.Generator, int], np.ndarray]
TemplateScene = Callable[[np.random.Generator, int], Callable[[np.random.Generator], np.ndarray]]


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    if kind == "triangle":
        top, bottom = cy - r, cy + r
        half = (yy - top) / (2 * r) * r
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    raise ValueError(kind)


def _paint(img: np.ndarray, kind: str, color: npt.ArrayLike, cx: float, cy: float, r: float) -> None:
    img[_shape_mask(kind, cx, cy, r, img.shape[0])] = color


def ordinary_scene(rng: np.random.Generator, size: int, background: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Two shapes in a relation on ``background`` (default: a random muted colour);
    returns (image uint8 HxWx3, caption)."""
    s1, s2 = rng.choice(SHAPES, 2)
    c1, c2 = rng.choice(list(COLORS), 2, replace=False)
    rel = rng.choice(RELATIONS)
    img = np.empty((size, size, 3), np.uint8)
    if background is None:
        img[:] = np.clip(rng.uniform(20, 150) + rng.uniform(-25, 25, 3), 0, 255)  # muted, unnamed
    else:
        img[:] = background
    r1, r2 = rng.uniform(0.13, 0.2, 2) * size
    a, b = rng.uniform(0.25, 0.42) * size, rng.uniform(0.58, 0.75) * size  # first, second
    o1, o2 = rng.uniform(0.3, 0.7, 2) * size
    (x1, y1), (x2, y2) = ((o1, a), (o2, b)) if rel == "above" else ((a, o1), (b, o2))
    _paint(img, s1, COLORS[c1], x1, y1, r1)
    _paint(img, s2, COLORS[c2], x2, y2, r2)
    caption = f"a {c1} {s1} {rel} a {c2} {s2}"
    return img, caption


def _stripes(rng: np.random.Generator, size: int, c1: npt.ArrayLike, c2: npt.ArrayLike) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(5, 10)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
    img = np.where((np.floor(phase) % 2 == 0)[..., None], c1, c2).astype(np.uint8)
    return img


def canary_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A distinctive image: random two-colour stripes and three random shapes."""
    c1, c2 = rng.integers(0, 256, (2, 3))
    img = _stripes(rng, size, c1, c2)
    for _ in range(3):
        kind = rng.choice(SHAPES)
        _paint(img, kind, rng.integers(0, 256, 3), *rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0.1, 0.18) * size)  # type: ignore[call-arg]  # mypy: an unpacked array fills every parameter
    return img


def template_layout(rng: np.random.Generator, size: int) -> Callable[[np.random.Generator], np.ndarray]:
    """A fixed layout (frame, bars, stripes) and a function adding the varying detail."""
    base = _stripes(rng, size, rng.integers(0, 256, 3), rng.integers(0, 256, 3))
    frame = rng.integers(0, 256, 3)
    base[:3], base[-3:], base[:, :3], base[:, -3:] = frame, frame, frame, frame
    base[6:9, 6 : size - 6] = rng.integers(0, 256, 3)
    inner = (slice(size // 2 - 7, size // 2 + 7),) * 2
    base[inner] = rng.integers(0, 256, 3)

    def variant(vrng: np.random.Generator) -> np.ndarray:
        img = base.copy()
        _paint(img, vrng.choice(SHAPES), vrng.integers(0, 256, 3), *(size / 2 + vrng.uniform(-2, 2, 2)), 0.16 * size)  # type: ignore[call-arg]  # as in canary_scene
        return img

    return variant


def _word(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        w = "".join(rng.choice(_SYLLABLES, 3))
        if w not in used:
            used.add(w)
            return w


def _save_png(path: Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def cached_manifest(root: Path, params: dict, what: str) -> pd.DataFrame | None:
    """The manifest already generated under ``root`` with ``params`` (None if there is none);
    a DataError when ``root`` holds ``what`` generated with other parameters."""
    if not (root / MANIFEST).exists():
        return None
    made = read_json(root / PARAMS) if (root / PARAMS).exists() else None
    if made != params:
        raise DataError(
            f"{root} holds {what} generated with other parameters ({made}); set data.root to another folder"
        )
    try:
        return read_parquet(root / MANIFEST)
    except DataError as err:  # a damaged cache (a bad disk, a copy cut short) is rebuilt
        log.warning("%s; rebuilding %s", err, what)
        return None


def generate_testbed(
    root: str | Path,
    seed: int = 0,
    resolution: int = 32,
    n_ordinary: int = 512,
    canary_counts: Sequence[int] = (1, 4, 16, 64),
    canaries_per_count: int = 4,
    n_templates: int = 2,
    template_copies: int = 32,
    n_heldout: int = 256,
    scenes: tuple[OrdinaryScene, CanaryScene, TemplateScene] | None = None,
    variant: dict | None = None,
) -> pd.DataFrame:
    """Write the testbed images and ``manifest.parquet`` under ``root``; returns the manifest.

    One row per training example (a canary duplicated 16x has 16 rows pointing at one
    file), with ``kind`` (ordinary/canary/template/heldout), ``group``, ``dup_count`` and
    ``split`` (train/heldout) as ground truth for every later stage. Idempotent.
    ``scenes``: the ``(ordinary, canary, template)`` scene functions (default: the flat
    ones here); ``variant``: what names other scenes among the recorded parameters.
    """
    root = Path(root)
    ordinary_scene_, canary_scene_, template_layout_ = scenes or (ordinary_scene, canary_scene, template_layout)
    params = dict(
        seed=seed,
        resolution=resolution,
        n_ordinary=n_ordinary,
        canary_counts=list(canary_counts),
        canaries_per_count=canaries_per_count,
        n_templates=n_templates,
        template_copies=template_copies,
        n_heldout=n_heldout,
        **(variant or {}),
    )
    cached = cached_manifest(root, params, "a testbed")
    if cached is not None:
        return cached
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()

    def add(img: np.ndarray, caption: str, kind: str, group: str, dup: int, split: str, copies: int = 1) -> None:
        file = f"images/{len({r['file'] for r in rows}):05d}.png"
        _save_png(root / file, img)
        for _ in range(copies):
            rows.append(
                dict(
                    image_id=f"tb{len(rows):06d}",
                    file=file,
                    caption=caption,
                    kind=kind,
                    group=group,
                    dup_count=dup,
                    split=split,
                )
            )

    for _ in range(n_ordinary):
        img, cap = ordinary_scene_(rng, resolution)
        add(img, cap, "ordinary", "", 1, "train")
    for count in canary_counts:
        for j in range(canaries_per_count):
            add(
                canary_scene_(rng, resolution),
                f"the {_word(rng, used)} emblem",
                "canary",
                f"canary-x{count}-{j}",
                count,
                "train",
                copies=count,
            )
    for t in range(n_templates):
        detail, cap = template_layout_(rng, resolution), f"a {_word(rng, used)} poster"
        for _ in range(template_copies):
            add(detail(rng), cap, "template", f"template-{t}", template_copies, "train")
    for _ in range(n_heldout):
        img, cap = ordinary_scene_(rng, resolution)
        add(img, cap, "heldout", "", 0, "heldout")
    df = pd.DataFrame(rows)
    write_json(root / PARAMS, params)
    write_parquet(root / MANIFEST, df)  # last: its presence means the testbed is complete
    return df
