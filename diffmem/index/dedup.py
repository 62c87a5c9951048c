"""Near-duplicate groups within one image set (the library behind ``diffmem dedup``).

Every vector goes through a FAISS range search (inner product on L2-normalised descriptors:
cosine), exact by default or IVF at scale, in query batches: the pairs above the threshold
of each batch are merged into a running component labelling at once, so memory stays
bounded by the index, the labels and one batch's pairs, however many pairs there are. An
optional exact pass then joins images whose decoded pixels are identical (a digest of the
RGB array, so a PNG and its lossless re-encoding join, a re-saved JPEG does not), even above
the threshold; only images that could be pixel-identical to another are decoded for it: a
neighbour at cosine >= :data:`EXACT_COSINE` of the same size. Each group gets a
representative (its first member, or its most central one) and each member its cosine to
that representative.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from diffmem.data.datasets import MAX_PIXELS, load_image
from diffmem.data.webdataset import read_member, tar_member
from diffmem.errors import ConfigError, DataError
from diffmem.index.build import build_index

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)
REPRESENTATIVES = ("central", "first")
QUERY_BATCH = 4096  # queries per range_search call (bounds one batch's pairs)
#: pixel-identical images are this close or closer: 1 up to rounding when the embed decodes them
#: alike (the float path; the ONNX path below its JPEG draft size), >= 0.998 when it decodes
#: only one JPEG at reduced size (``DRAFT_MARGIN`` in :mod:`diffmem.data.decode`)
EXACT_COSINE = 0.99


def check_threshold(threshold: float) -> float:
    """A cosine threshold: in [-1, 1]."""
    t = float(threshold)
    if not -1.0 <= t <= 1.0:
        raise ConfigError(f"threshold={threshold}: a cosine threshold must be in [-1, 1]")
    return t


def check_images(root: Path, files: Iterable[str]) -> None:
    """Refuse, naming the file, the first image PIL cannot identify from its header (a cheap
    look at every file before any work; a file damaged further in fails when decoded)."""
    from PIL import Image, UnidentifiedImageError

    for file in files:
        path = Path(root) / file
        if tar_member(path) is not None:  # a webdataset member: read with its shard when embedded
            continue
        try:
            with Image.open(path):
                pass
        except FileNotFoundError as err:
            raise DataError(f"{path}: image file not found") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{path}: corrupt or unreadable image (not a format PIL can identify)") from err


def _size_key(path: Path) -> tuple[int, int] | None:
    """The image's size from its header alone, in either orientation (EXIF may swap it), or
    None when the header cannot be read (the decode then names the problem)."""
    from PIL import Image

    member = tar_member(path)
    try:
        with Image.open(io.BytesIO(read_member(*member)) if member else path) as im:
            return min(im.size), max(im.size)
    except (OSError, SyntaxError, ValueError, DataError, Image.DecompressionBombError):
        return None


def pixel_hashes(root: Path, files: Iterable[str], max_pixels: int = MAX_PIXELS) -> list[str | None]:
    """A digest of each image's decoded RGB pixels and shape (identical pictures, whatever their
    file or lossless encoding, share it), or None for an image whose size no other image has
    (so no other can be pixel-identical to it): only images of shared sizes, read from the
    headers, are decoded."""
    paths = [Path(root) / f for f in files]
    keys = [_size_key(f) for f in paths]
    shared = Counter(keys)
    decode = [i for i, k in enumerate(keys) if k is None or shared[k] > 1]  # None: an unread header
    out: list[str | None] = [None] * len(paths)
    for i in decode:
        img = load_image(paths[i], max_pixels=max_pixels)
        digest = hashlib.sha256(np.asarray(img.shape, np.int64).tobytes())
        digest.update(img.tobytes())  # C order: the bytes of the contiguous array
        out[i] = digest.hexdigest()[:32]
    log.info("pixel hashes: %d of %d images share a size with another and were decoded", len(decode), len(paths))
    return out


def merge_components(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``labels`` (each row's component, labelled by its lowest row) after joining rows ``a[i]``
    and ``b[i]``: the components the new pairs touch are merged (minimum-label propagation
    with pointer jumping on their labels, in numpy) and every row relabelled in one pass."""
    la, lb = labels[a], labels[b]
    keep = la != lb
    if not keep.any():
        return labels
    nodes, inv = np.unique(np.concatenate([la[keep], lb[keep]]), return_inverse=True)
    u, v = inv[: keep.sum()], inv[keep.sum() :]
    comp = np.arange(len(nodes))  # per node: a node of its component, lowest at the fixed point
    while True:
        low = np.minimum(comp[u], comp[v])
        new = comp.copy()
        for end in (u, v, comp[u], comp[v]):  # each end and its current label take the pair's lowest
            np.minimum.at(new, end, low)
        new = new[new]
        if np.array_equal(new, comp):
            break
        comp = new
    remap = np.arange(len(labels), dtype=labels.dtype)
    remap[nodes] = nodes[comp]
    return remap[labels]


def range_pairs(
    index: faiss.Index, x: np.ndarray, threshold: float, batch_size: int = QUERY_BATCH
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per query batch, the pairs ``(i, j)``, ``i != j``, of rows of ``x`` (the vectors in
    ``index``, in order) whose inner product ``s`` is at least ``threshold``: ``(i, j, s)``."""
    for start in range(0, len(x), batch_size):
        lims, sims, ids = index.range_search(np.ascontiguousarray(x[start : start + batch_size]), threshold)
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = rows != ids
        yield rows[keep], ids[keep], sims[keep]


def components(
    x: np.ndarray,
    threshold: float,
    factory: str = "Flat",
    nprobe: int | None = None,
    train_sample: int | None = None,
    seed: int = 0,
    batch_size: int = QUERY_BATCH,
    close_at: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The connected components of the graph joining rows of ``x`` (L2-normalised) whose cosine
    is at least ``threshold``, each row labelled by the lowest row of its component; and which
    rows have another at cosine ``close_at`` or more (none when None; one search serves both).
    With an approximate ``factory`` (IVF) a pair is found when either end finds the other."""
    check_threshold(threshold)
    index = build_index(x, factory, "ip", train_sample=train_sample, seed=seed, nprobe=nprobe, name="dedup vectors")
    labels = np.arange(len(x), dtype=np.int64)
    close = np.zeros(len(x), bool)
    search_at = threshold if close_at is None else min(threshold, close_at)
    for a, b, sim in range_pairs(index, x, search_at, batch_size):
        if close_at is not None:
            near = sim >= close_at
            close[a[near]] = close[b[near]] = True
        keep = sim >= threshold
        labels = merge_components(labels, a[keep], b[keep])
    return labels, close


def representatives(
    x: np.ndarray, labels: np.ndarray, how: str = "central", batch_size: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """``(representative row, cosine to it)`` per row of ``x`` for components ``labels`` (each
    the component's lowest row). ``first``: that lowest row; ``central``: the member with the
    highest summed cosine to the group (``x_i . sum_g``, linear in the group's size; ties: the
    lowest row)."""
    if how not in REPRESENTATIVES:
        raise ConfigError(f"representative '{how}' is not one of {', '.join(REPRESENTATIVES)}")
    rep = labels.copy()
    if how == "central":
        groups, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
        multi = np.flatnonzero(sizes[inv] > 1)  # rows of groups with more than one member
        if len(multi):
            g = np.unique(inv[multi], return_inverse=True)[1]
            sums = np.zeros((g.max() + 1, x.shape[1]), np.float32)
            for s in range(0, len(multi), batch_size):
                np.add.at(sums, g[s : s + batch_size], x[multi[s : s + batch_size]])
            central = np.einsum("ij,ij->i", x[multi], sums[g])
            order = np.lexsort((multi, -central, g))  # per group: most central first, then lowest row
            first = order[np.r_[True, g[order][1:] != g[order][:-1]]]
            rep[multi] = multi[first][g]
    score = np.empty(len(x), np.float32)
    for s in range(0, len(x), batch_size):
        score[s : s + batch_size] = np.einsum("ij,ij->i", x[s : s + batch_size], x[rep[s : s + batch_size]])
    return rep, score


def group_vectors(
    x: np.ndarray,
    threshold: float,
    pixel_digests: Callable[[np.ndarray], Sequence[str | None]] | None = None,
    *,
    representative: str = "central",
    factory: str = "Flat",
    nprobe: int | None = None,
    train_sample: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Near-duplicate groups of the rows of ``x``: ``group`` (numbered by size, largest first,
    then by first row), ``size``, ``representative`` (its row) and ``score`` (cosine to it), one
    row per row of ``x``. With ``pixel_digests`` (rows -> one digest each, None for a row no
    other can equal: :func:`pixel_hashes` of their files), asked only for the rows with a
    neighbour at cosine >= :data:`EXACT_COSINE`, rows with the same digest join whatever the
    threshold, and ``exact`` says whether a row is pixel-identical to its representative."""
    labels, close = components(
        x, threshold, factory, nprobe, train_sample, seed, close_at=None if pixel_digests is None else EXACT_COSINE
    )
    codes = None
    if pixel_digests is not None:
        rows = np.flatnonzero(close)
        digests = list(pixel_digests(rows))
        if len(digests) != len(rows):
            raise DataError(f"{len(digests)} pixel digests for {len(rows)} rows")
        cls, _ = pd.factorize(pd.Series(digests, dtype=object))  # no digest (None): -1
        rows, cls = rows[cls >= 0], cls[cls >= 0]
        first = rows[np.unique(cls, return_index=True)[1]]  # by class: its first row (rows ascend)
        labels = merge_components(labels, rows, first[cls])
        codes = np.arange(len(x))  # a row is its own class unless it shares a digest
        codes[rows] = first[cls]
    rep, score = representatives(x, labels, representative)
    df = pd.DataFrame({"label": labels, "representative": rep, "score": score})
    df["size"] = df.groupby("label")["label"].transform("size")
    order = df.drop_duplicates("label").sort_values(["size", "label"], ascending=[False, True])
    df["group"] = df["label"].map(pd.Series(np.arange(len(order)), index=order["label"]))
    if codes is not None:
        df["exact"] = codes[rep] == codes
    return df[["group", "size", "representative", "score"] + (["exact"] if codes is not None else [])]


def groups_by_row(rows: pd.DataFrame, items: pd.DataFrame, grouped: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset row from one row per embedded file: its file's group and score; the
    representative file's first row is the group's representative. Groups are numbered by
    their number of rows, largest first."""
    per_file = grouped.rename(columns={"group": "group_id"}).drop(columns="size").reset_index(drop=True)
    per_file["file"] = items["file"].to_numpy()
    per_file["rep_file"] = items["file"].to_numpy()[grouped["representative"].to_numpy()]
    out = rows[["image_id", "file"]].rename(columns={"image_id": "item_id"}).merge(per_file, on="file")
    out["is_representative"] = (out["file"] == out["rep_file"]) & ~out.duplicated("file")
    out["group_size"] = out.groupby("group_id")["file"].transform("size")
    order = out.drop_duplicates("group_id").sort_values(["group_size", "group_id"], ascending=[False, True])
    out["group_id"] = out["group_id"].map(pd.Series(np.arange(len(order)), index=order["group_id"].to_numpy()))
    cols = ["group_id", "group_size", "item_id", "file", "score", "is_representative"]
    out = out[cols + (["exact"] if "exact" in out else []) + ["rep_file"]]
    return out.sort_values(
        ["group_id", "is_representative", "score"], ascending=[True, False, False], kind="stable"
    ).reset_index(drop=True)
