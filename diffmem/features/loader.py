"""Images -> descriptors at scale: decoding beside the descriptor, batches bucketed by size.

A descriptor that takes uint8 images (``embed_uint8``: the ONNX ones) gets the fast path:
each image is decoded at reduced size where the format allows (JPEG draft) and resized in
uint8 to the recipe's exact size (:func:`decode_uint8`), in ``num_workers`` threads while
the descriptor runs (PIL and onnxruntime release the GIL; 0: in turn, in the main thread).
No float copy of an image is made and at most a few batches of small uint8 images are held.
Its vectors differ from the float path's (full decode, float resize) by resampling rounding
only: cosine >= 0.995 to it on photos (``docs/embedding.md``).

Otherwise each image is decoded (:func:`diffmem.data.load_image`) and resized by the
extractor's own resize step (:meth:`~diffmem.features.transforms.Preprocess.resize_only`): on a
CPU in a worker process, so the main process only runs the descriptor; on a GPU the workers
(``num_workers`` threads) only decode, into pinned memory, and the image is copied to the
GPU as uint8 and resized there, so the CPU's work per image is the decode alone. Nothing in
the loop reads a result back before the next batch is queued (a batch's vectors are
fetched after the next one is submitted), so decoding overlaps the GPU's forward pass.
Resized images of one shape form a bucket;
a full bucket (``batch_size`` images) runs as one batch. Mixed-size photos thus batch by
their resized shape (one shape for square recipes, one per aspect ratio for short-side
ones) instead of one forward call per image. The vectors equal those of the extractor run
on each image alone (the resize step is idempotent, the rest of the recipe per-image).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from diffmem.data import load_image
from diffmem.data.datasets import MAX_PIXELS
from diffmem.errors import DataError
from diffmem.features.transforms import PIL_FILTERS, Preprocess

if TYPE_CHECKING:
    import torch

    from diffmem.features.base import Extractor
    from diffmem.features.onnx import OnnxExtractor

#: images each worker hands over at once (small: a handover holds decoded float images)
CHUNK = 8
#: images per call on the uint8 path at most: onnxruntime on a CPU is no faster per image at 16
#: than at 1 or 4 (sscd_distilled 12.1, 11.0, 11.3 ms; sscd_onnx 54, 54, 57 ms), and a call
#: holds its batch's activations (peak RSS 640 MB at 16, 480 MB at 4 on 500 photos)
UINT8_BATCH = 4


class DecodedImages:
    """Item ``j`` -> ``(index, float [3, h, w] image in [0, 1] resized by ``resize``, None)``,
    or ``(index, None, error)`` for an image that cannot be read (the caller decides): a
    map-style dataset for torch's DataLoader (not a subclass, so this module loads without torch)."""

    def __init__(
        self,
        root: Path,
        files: list[str],
        indices: list[int],
        resolution: int | None,
        resize: Callable[[torch.Tensor], torch.Tensor] | None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.root, self.files, self.indices = Path(root), files, indices
        self.resolution, self.resize, self.max_pixels = resolution, resize, max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[int, torch.Tensor | None, str | None]:
        import torch

        path = self.root / self.files[self.indices[j]]
        return _attempt(
            self.indices[j],
            lambda: unit_image(torch.from_numpy(load_image(path, self.resolution, self.max_pixels)), self.resize),
        )


def _attempt(i: int, decode: Callable[[], Any]) -> tuple[int, Any, str | None]:
    """``(i, decode(), None)``, or ``(i, None, error)`` for an image that cannot be read."""
    try:
        return i, decode(), None
    except DataError as err:
        return i, None, str(err)


def unit_image(image: torch.Tensor, resize: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """A uint8 ``[h, w, 3]`` image (on any device) as float ``[3, h', w']`` in [0, 1], resized by
    ``resize`` (a recipe's ``resize_only``) where given, on the image's device."""
    x = image.permute(2, 0, 1)[None].float().div_(255.0)
    return (x if resize is None else resize(x))[0]


def decode_uint8(
    path: Path, pre: Preprocess, resolution: int | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """The image at ``path`` preprocessed by ``pre`` in uint8 ``[h, w, 3]`` (a JPEG decoded at
    reduced size, resized with PIL to exactly ``pre``'s size; not normalised)."""
    arr = load_image(path, resolution, max_pixels, size=pre.resize_size, resample=PIL_FILTERS[pre.interpolation])
    return pre.finish_uint8(arr)


def threaded(fn: Callable, items: Iterable, threads: int, ahead: int) -> Iterator:
    """``map(fn, items)`` in order, computed by ``threads`` threads at most ``ahead`` items
    ahead of the consumer (bounded memory); in the caller's thread when ``threads`` is 0."""
    if threads == 0:
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(fn, x) for x in islice(items, ahead))
        try:
            while pending:
                out = pending.popleft().result()
                pending.extend(pool.submit(fn, x) for x in islice(items, 1))
                yield out
        finally:
            for f in pending:
                f.cancel()


def on_device(
    root: Path,
    files: list[str],
    indices: list[int],
    device: torch.device,
    resize: Callable[[torch.Tensor], torch.Tensor] | None,
    *,
    num_workers: int,
    resolution: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Iterator[tuple[int, torch.Tensor | None, str | None]]:
    """What :class:`DecodedImages` gives, in order, but decoded in ``num_workers`` threads (pinned
    on a GPU) and converted and resized on ``device``: the same values, the device's work."""
    import torch

    pin = device.type == "cuda"

    def decode(i: int) -> torch.Tensor:
        arr = torch.from_numpy(load_image(Path(root) / files[i], resolution, max_pixels))
        return arr.pin_memory() if pin else arr

    loads = threaded(lambda i: _attempt(i, lambda: decode(i)), indices, num_workers, ahead=2 * num_workers + 2)
    for i, arr, err in loads:
        yield i, None if arr is None else unit_image(arr.to(device, non_blocking=True), resize), err


def _one_thread(_worker: int) -> None:
    import torch

    torch.set_num_threads(1)  # the workers decode; threads would fight the descriptor's


def embed_images(
    extractor: Extractor,
    root: Path,
    files: list[str],
    parts: list[int],
    part_size: int,
    *,
    batch_size: int,
    num_workers: int = 0,
    resolution: int | None = None,
    skip_errors: bool = False,
    max_pixels: int = MAX_PIXELS,
    progress: Callable[[int], object] | None = None,
    resize_on_device: bool | None = None,
) -> Iterator[tuple[int, np.ndarray, pd.DataFrame]]:
    """``(part, vectors, skipped)`` for each of ``parts`` (item ranges of ``part_size`` of
    ``files``), in order. ``skipped`` lists the unreadable images (``index``, ``file``,
    ``error``) when ``skip_errors``; otherwise the first raises a one-line DataError naming
    it. At most ``4 * batch_size`` decoded images wait in buckets (the largest runs early).
    ``resize_on_device``: resize a torch descriptor's images on its device (:func:`on_device`);
    None: when that device is a GPU."""
    indices = [i for p in parts for i in range(p * part_size, min((p + 1) * part_size, len(files)))]
    pre = getattr(extractor, "preprocess", None)
    forward: Callable[[Any], Any]
    stack: Callable[[list[Any]], Any]
    fetch: Callable[[Any], np.ndarray] = np.asarray
    if hasattr(extractor, "embed_uint8"):
        assert pre is not None  # a uint8 descriptor resizes by its recipe

        def load(i: int) -> tuple[int, np.ndarray | None, str | None]:
            return _attempt(i, lambda: decode_uint8(Path(root) / files[i], pre, resolution, max_pixels))

        onnx = cast("OnnxExtractor", extractor)  # the descriptor that takes uint8 input
        batch_size = min(batch_size, onnx.batch_size, UINT8_BATCH)
        items = threaded(load, indices, num_workers, ahead=2 * batch_size)
        forward, stack = onnx.embed_uint8, np.stack
    else:
        import torch

        device = torch.device(extractor.device)
        resize = pre.resize_only if pre is not None else None
        if resize_on_device is None:
            resize_on_device = device.type == "cuda"
        if resize_on_device:
            items = on_device(
                root,
                files,
                indices,
                device,
                resize,
                num_workers=num_workers,
                resolution=resolution,
                max_pixels=max_pixels,
            )
        else:
            dataset = DecodedImages(root, files, indices, resolution, resize, max_pixels)
            loader = torch.utils.data.DataLoader(
                cast("torch.utils.data.Dataset[Any]", dataset),  # map-style, not a subclass (see DecodedImages)
                batch_size=CHUNK,
                num_workers=num_workers,
                collate_fn=list,
                worker_init_fn=_one_thread if num_workers else None,
            )
            items = (item for chunk in loader for item in chunk)
        forward, stack, fetch = extractor.embed_valid, torch.stack, (lambda out: out.cpu().numpy())
    buckets: dict[tuple, list[tuple]] = {}  # shape -> [(index, image)]
    vectors: dict[int, np.ndarray] = {}
    skipped: list[dict] = []
    queued: deque[tuple[list[int], Any]] = deque()  # submitted batches whose vectors are not fetched yet

    def collect(keep: int) -> None:
        while len(queued) > keep:
            idx, out = queued.popleft()
            vectors.update(zip(idx, fetch(out)))

    def run(bucket: list[tuple]) -> None:
        batch = stack([x for _, x in bucket])
        queued.append(([i for i, _ in bucket], forward(batch)))  # type: ignore[arg-type]  # each branch pairs its forward with its stack
        bucket.clear()
        collect(keep=1)  # the batch just queued runs while the next one is prepared

    def finish(p: int) -> tuple[int, np.ndarray, pd.DataFrame]:
        for bucket in buckets.values():
            if bucket:
                run(bucket)
        collect(keep=0)
        idx = sorted(vectors)
        out = np.stack([vectors.pop(i) for i in idx]) if idx else np.zeros((0, extractor.dim), np.float32)
        skip = pd.DataFrame(skipped, columns=["index", "file", "error"])
        skipped.clear()
        return p, out, skip

    current = parts[0] if parts else None
    for i, x, err in items:
        if i // part_size != current:
            assert current is not None  # parts is not empty when there are items
            yield finish(current)
            current = i // part_size
        if progress is not None:
            progress(1)
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
    if current is not None:
        yield finish(current)
