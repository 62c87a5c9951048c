"""Pixel-space copy tests: Carlini et al. 2023 tiled L2 and extraction, Webster 2023 SSE labels.

Images are float numpy arrays (or torch tensors) in [0, 1], channels last: one image
``[H, W, C]``, a set ``[N, H, W, C]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from diffmem.checks import check_choice, check_int, check_positive
from diffmem.errors import DataError
from diffmem.metrics.replication import as_array


def _images(x: npt.ArrayLike, name: str, ndim: int | tuple[int, ...] = (3, 4)) -> np.ndarray:
    arr = as_array(x, name, ndim=ndim, dtype=None)
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{name}: expected float images in [0, 1], got dtype {arr.dtype} (uint8? divide by 255)")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 1:
        raise DataError(f"{name}: values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
    return arr


def _check_shapes(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    """Same image shape; image counts equal when both are sets (else one is a single image)."""
    if a.shape[-3:] != b.shape[-3:]:
        raise DataError(f"{name_b}: image shape {b.shape[-3:]} does not match {name_a}'s {a.shape[-3:]}")
    if a.ndim == b.ndim == 4 and len(a) != len(b):
        raise DataError(f"{name_b}: {len(b)} images, {name_a} has {len(a)} (pairs must match)")


def resize_images(images: npt.ArrayLike, size: int = 256) -> np.ndarray:
    """Resize ``[H, W, C]`` or ``[N, H, W, C]`` images to ``size x size`` (bilinear, anti-aliased).

    Webster's SSE thresholds assume 256 x 256 x 3 images; non-square inputs are stretched.
    """
    from skimage.transform import resize  # slow import, only needed here

    images = _images(images, "images")
    shape = images.shape[:-3] + (size, size, images.shape[-1])
    return resize(images, shape, order=1, anti_aliasing=True).astype(images.dtype, copy=False)


def _tiles(images: np.ndarray, grid: int, name: str) -> Iterator[np.ndarray]:
    """The ``grid x grid`` non-overlapping tiles of ``[N, H, W, C]`` images, each as float64 ``[N, P]``.

    Sides not divisible by ``grid`` are split as ``np.array_split`` does (first tiles one pixel larger).
    """
    check_positive(grid, "grid")
    if min(images.shape[1:3]) < grid:
        raise DataError(f"{name}: {images.shape[1:3]} pixels cannot be split into a {grid}x{grid} grid")
    for band in np.array_split(images, grid, axis=1):
        for tile in np.array_split(band, grid, axis=2):
            yield tile.astype(np.float64).reshape(len(tile), -1)


def tile_l2_distance(a: npt.ArrayLike, b: npt.ArrayLike, grid: int = 4) -> float | np.ndarray:
    """Carlini et al.'s tiled distance: the max over ``grid x grid`` tiles of the per-tile RMS difference.

    Per tile: ``sqrt(mean((a - b)^2))`` over its pixels and channels (the L2 norm divided by
    sqrt(number of values), Carlini's dimension-normalised L2). ``a``, ``b``: ``[H, W, C]`` or
    ``[N, H, W, C]`` (paired; a single image is compared with every image of the other set).
    Returns a float for two single images, else ``[N]``.
    """
    a, b = _images(a, "a"), _images(b, "b")
    _check_shapes(a, b, "a", "b")
    shape = a.shape[-3:]
    per_tile = [
        np.sqrt(np.mean((ta - tb) ** 2, axis=1))
        for ta, tb in zip(_tiles(a.reshape((-1,) + shape), grid, "a"), _tiles(b.reshape((-1,) + shape), grid, "b"))
    ]
    dist = np.max(per_tile, axis=0)
    return dist.item() if a.ndim == b.ndim == 3 else dist


def tile_l2_matrix(a: npt.ArrayLike, b: npt.ArrayLike | None = None, grid: int = 4) -> np.ndarray:
    """Pairwise :func:`tile_l2_distance` between image sets ``a`` ``[N, H, W, C]`` and ``b`` ``[M, H, W, C]``.

    ``b=None`` compares ``a`` with itself (zero diagonal). Returns ``[N, M]``.
    """
    a = _images(a, "a", ndim=4)
    b = a if b is None else _images(b, "b", ndim=4)
    _check_shapes(a[0], b[0], "a", "b")
    out = np.zeros((len(a), len(b)))
    for ta, tb in zip(_tiles(a, grid, "a"), _tiles(b, grid, "b")):
        sq = (ta**2).sum(1)[:, None] + (tb**2).sum(1)[None, :] - 2 * ta @ tb.T
        np.maximum(out, np.sqrt(np.clip(sq, 0, None) / ta.shape[1]), out=out)
    if b is a:
        np.fill_diagonal(out, 0.0)
    return out


def extraction_from_distances(
    distances: npt.ArrayLike, threshold: float, method: str = "clique", min_clique: int = 10, min_component: int = 3
) -> dict:
    """Extraction test on the generations' distances ``[N, N]``: edges join pairs closer than ``threshold``.

    ``"clique"`` (Carlini et al.): extracted when the maximum clique has >= ``min_clique`` nodes
    (exact, networkx). ``"components"`` (MemControl's reimplementation): when the largest
    connected component has >= ``min_component`` nodes. Returns ``extracted``, ``size``
    (of the largest clique / component), its ``members`` (indices), ``min_size``, ``method``, ``threshold``.
    """
    import networkx as nx  # installed with torch

    check_choice(method, "method", ("clique", "components"))
    dist = as_array(distances, "distances", ndim=2)
    if dist.shape[0] != dist.shape[1] or not np.allclose(dist, dist.T):
        raise DataError(f"distances: expected a symmetric square matrix, got shape {dist.shape}")
    graph = nx.Graph()
    graph.add_nodes_from(range(len(dist)))
    graph.add_edges_from(np.argwhere(np.triu(dist < threshold, k=1)).tolist())
    if method == "clique":
        members, min_size = max(nx.find_cliques(graph), key=len), min_clique
    else:
        members, min_size = max(nx.connected_components(graph), key=len), min_component
    return {
        "extracted": len(members) >= min_size,
        "size": len(members),
        "members": sorted(members),
        "min_size": min_size,
        "method": method,
        "threshold": threshold,
    }


def carlini_extraction(
    gen_images: npt.ArrayLike,
    threshold: float,
    method: str = "clique",
    min_clique: int = 10,
    min_component: int = 3,
    grid: int = 4,
) -> dict:
    """Is a prompt extracted? :func:`extraction_from_distances` on its generations' :func:`tile_l2_matrix`.

    Carlini et al. use 500 generations per prompt at 512 px with a 4x4 grid and ``min_clique=10``.
    """
    gen = _images(gen_images, "gen_images", ndim=4)
    return extraction_from_distances(
        tile_l2_matrix(gen, grid=grid), threshold, method=method, min_clique=min_clique, min_component=min_component
    )


def _sse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    sq = (a - b) ** 2
    if mask is not None:
        sq = sq * mask[:, :, None]
    return sq.sum(axis=(-3, -2, -1), dtype=np.float64)


def _mask(mask: npt.ArrayLike, hw: tuple[int, int]) -> np.ndarray:
    mask = as_array(mask, "mask", ndim=2, dtype=bool)
    if mask.shape != hw:
        raise DataError(f"mask: shape {mask.shape} does not match the images' {hw}")
    return mask


def webster_sse(gen: npt.ArrayLike, real: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float | np.ndarray:
    """Sum of squared errors between generation(s) ``gen`` and ``real`` over pixels and channels.

    ``mask`` (``[H, W]`` bool) restricts the sum to its pixels. Webster's thresholds assume
    256 x 256 x 3 images in [0, 1] (see :func:`resize_images`). Returns a float or ``[N]``.
    """
    gen, real = _images(gen, "gen"), _images(real, "real")
    _check_shapes(gen, real, "gen", "real")
    sse = _sse(gen, real, None if mask is None else _mask(mask, gen.shape[-3:-1]))
    return sse.item() if sse.ndim == 0 else sse


def fixed_pixel_mask(
    generations: npt.ArrayLike, tol: float = 0.03, erosion_iterations: int = 1, dilation_iterations: int = 1
) -> np.ndarray:
    """Webster's template mask ``[H, W]``: pixels whose value varies by < ``tol`` (max - min, every channel)
    across the ``[N, H, W, C]`` generations of one prompt, then eroded and dilated.

    The morphology (3x3 square structuring element) drops isolated fixed pixels and keeps regions
    at least 3 pixels wide. Zero iterations skips a step.
    """
    gens = _images(generations, "generations", ndim=4)
    for name, iterations in (("erosion_iterations", erosion_iterations), ("dilation_iterations", dilation_iterations)):
        check_int(iterations, name, 0)
    from scipy import ndimage  # here: scipy costs ~0.4 s to import, and every stage imports this module

    fixed = (np.ptp(gens, axis=0) < tol).all(axis=-1)
    square = np.ones((3, 3), dtype=bool)
    if erosion_iterations:
        fixed = ndimage.binary_erosion(fixed, square, iterations=erosion_iterations)
    if dilation_iterations:
        fixed = ndimage.binary_dilation(fixed, square, iterations=dilation_iterations)
    return fixed


def webster_scores(
    gens: npt.ArrayLike, real: npt.ArrayLike, retrieved: npt.ArrayLike | None = None, mask: npt.ArrayLike | None = None
) -> dict[str, float]:
    """The SSEs behind :func:`webster_label` for one prompt's generations ``[N, H, W, C]``.

    ``mv_sse``: min over generations of the SSE to the ``real`` (training) image ``[H, W, C]``.
    ``tv_sse``: the same over the template ``mask`` only (default :func:`fixed_pixel_mask` of
    ``gens``; inf when the mask is empty). ``rv_sse``: min SSE to any ``retrieved`` image
    (``[H, W, C]`` or ``[R, H, W, C]``; inf without one). Also ``mask_fraction``.
    """
    gens, real = _images(gens, "gens", ndim=4), _images(real, "real", ndim=3)
    _check_shapes(gens, real, "gens", "real")
    mask = fixed_pixel_mask(gens) if mask is None else _mask(mask, gens.shape[1:3])
    rv = np.inf
    if retrieved is not None:
        retrieved = _images(retrieved, "retrieved")
        _check_shapes(gens[0], retrieved, "gens", "retrieved")
        rv = min(_sse(gens, r).min() for r in retrieved.reshape((-1,) + real.shape))
    return {
        "mv_sse": float(_sse(gens, real).min()),
        "tv_sse": float(_sse(gens, real, mask).min()) if mask.any() else np.inf,
        "rv_sse": float(rv),
        "mask_fraction": float(mask.mean()),
    }


def webster_label(
    gens: npt.ArrayLike,
    real: npt.ArrayLike,
    retrieved: npt.ArrayLike | None = None,
    mask: npt.ArrayLike | None = None,
    mv_threshold: float = 2.5e3,
    tv_threshold: float = 2.5e3,
    rv_threshold: float = 3e3,
) -> str:
    """Webster's label for one prompt: ``"MV"`` (matching verbatim), ``"TV"`` (template verbatim),
    ``"RV"`` (retrieved verbatim) or ``"N"``; the first test passed wins, in that order.

    MV: ``mv_sse < mv_threshold``; TV: ``tv_sse < tv_threshold``; RV: ``rv_sse < rv_threshold``
    (see :func:`webster_scores`; pass ``mask`` to change the template mask's settings).
    """
    s = webster_scores(gens, real, retrieved, mask)
    for label, key, threshold in (
        ("MV", "mv_sse", mv_threshold),
        ("TV", "tv_sse", tv_threshold),
        ("RV", "rv_sse", rv_threshold),
    ):
        if s[key] < threshold:
            return label
    return "N"
