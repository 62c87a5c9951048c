"""Images -> descriptors at scale: decoding in DataLoader workers, batches bucketed by size.

Each image is decoded (:func:`diffmem.data.load_image`) and resized by the extractor's
own resize step (:meth:`~diffmem.features.transforms.Preprocess.resize_only`) in a worker,
so the main process only runs the descriptor. Resized images of one shape form a bucket;
a full bucket (``batch_size`` images) runs as one batch. Mixed-size photos thus batch by
their resized shape (one shape for square recipes, one per aspect ratio for short-side
ones) instead of one forward call per image. The vectors equal those of the extractor run
on each image alone (the resize step is idempotent, the rest of the recipe per-image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from diffmem.data import load_image
from diffmem.data.images import MAX_PIXELS
from diffmem.errors import DataError

#: images each worker hands over at once (small: a handover holds decoded float images)
CHUNK = 8


class DecodedImages(torch.utils.data.Dataset):
    """Item ``j`` -> ``(index, float [3, h, w] image in [0, 1] resized by ``resize``, None)``,
    or ``(index, None, error)`` for an image that cannot be read (the caller decides)."""

    def __init__(self, root: Path, files: list[str], indices: list[int], resolution: int | None, resize,
                 max_pixels: int = MAX_PIXELS):
        self.root, self.files, self.indices = Path(root), files, indices
        self.resolution, self.resize, self.max_pixels = resolution, resize, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = self.indices[j]
        try:
            arr = load_image(self.root / self.files[i], self.resolution, self.max_pixels)
        except DataError as err:
            return i, None, str(err)
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)
        if self.resize is not None:
            x = self.resize(x[None])[0]
        return i, x, None


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # the workers decode; threads would fight the descriptor's


def embed_images(extractor, root: Path, files: list[str], parts: list[int], part_size: int, *,
                 batch_size: int, num_workers: int = 0, resolution: int | None = None,
                 skip_errors: bool = False, max_pixels: int = MAX_PIXELS, progress=None) -> Iterator[tuple[int, np.ndarray, pd.DataFrame]]:
    """``(part, vectors, skipped)`` for each of ``parts`` (item ranges of ``part_size`` of
    ``files``), in order. ``skipped`` lists the unreadable images (``index``, ``file``,
    ``error``) when ``skip_errors``; otherwise the first raises a one-line DataError naming
    it. At most ``4 * batch_size`` decoded images wait in buckets (the largest runs early)."""
    indices = [i for p in parts for i in range(p * part_size, min((p + 1) * part_size, len(files)))]
    pre = getattr(extractor, "preprocess", None)
    dataset = DecodedImages(root, files, indices, resolution, pre.resize_only if pre is not None else None,
                            max_pixels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=CHUNK, num_workers=num_workers,
                                         collate_fn=list, worker_init_fn=_one_thread if num_workers else None)
    buckets: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    vectors: dict[int, np.ndarray] = {}
    skipped: list[dict] = []

    def run(bucket: list[tuple[int, torch.Tensor]]) -> None:
        out = extractor(torch.stack([x for _, x in bucket])).cpu().numpy()
        vectors.update(zip((i for i, _ in bucket), out))
        bucket.clear()

    def finish(p: int):
        for bucket in buckets.values():
            if bucket:
                run(bucket)
        idx = sorted(vectors)
        out = np.stack([vectors.pop(i) for i in idx]) if idx else np.zeros((0, extractor.dim), np.float32)
        skip = pd.DataFrame(skipped, columns=["index", "file", "error"])
        skipped.clear()
        return p, out, skip

    current = parts[0] if parts else None
    for chunk in loader:
        for i, x, err in chunk:
            if i // part_size != current:
                yield finish(current)
                current = i // part_size
            if err is not None:
                if not skip_errors:
                    raise DataError(f"{err} (set data.on_error=skip to leave unreadable images out)")
                skipped.append({"index": i, "file": files[i], "error": err})
                continue
            bucket = buckets.setdefault(tuple(x.shape), [])
            bucket.append((i, x))
            if len(bucket) >= batch_size:
                run(bucket)
            elif sum(map(len, buckets.values())) > 4 * batch_size:
                run(max(buckets.values(), key=len))
        if progress is not None:
            progress(len(chunk))
    if current is not None:
        yield finish(current)
