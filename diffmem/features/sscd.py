"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) from local TorchScript files.

The SSCD authors publish TorchScript exports that need no SSCD code: ``torch.jit.load``
and call on normalised [B, 3, H, W] images. They are MIT-licensed (the "License" section
of the repository's README); diffmem downloads nothing at run time, so the user fetches
them from the links in the README of https://github.com/facebookresearch/sscd-copy-detection
and points ``path`` at the file (or puts it under ``cache_dir`` with its published file
name). ``features=sscd_onnx`` runs the same model, int8, with no download at all.

Loading a TorchScript file runs code from it, so the file is checked against an
expected SHA256 first (``sha256``, or the pinned value of a known file); ``verify=false``
loads an unverified file (its digest is still recorded in ``info()``).

Config fields: ``path``, ``model`` (a key of :data:`KNOWN_MODELS`), ``cache_dir``,
``sha256``, ``verify``, ``preprocess`` (``sscd_official`` | ``dcr`` | ``nemo`` | dict),
``dim`` (expected output size; inferred when not given), ``device``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffmem.checks import did_you_mean
from diffmem.device import resolve_device
from diffmem.errors import ConfigError, DataError
from diffmem.features.base import Extractor, default_cache_dir, sha256_file
from diffmem.features.transforms import Preprocess, get_preprocess

if TYPE_CHECKING:  # imported where a model runs: the ONNX descriptors import this module for verify_file
    import torch

SSCD_SOURCE = "https://github.com/facebookresearch/sscd-copy-detection"
SSCD_LICENCE = "MIT"

#: The published TorchScript files. ``sha256`` None = no pinned digest known to us: give
#: ``sha256`` in the config (or ``verify=false``). The disc_mixup digest (98,791,638 bytes)
#: is not published by the SSCD authors; it is the value that several independent public
#: projects pin for the file served at dl.fbaipublicfiles.com/sscd-copy-detection/.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "sscd_disc_mixup": {
        "file": "sscd_disc_mixup.torchscript.pt",
        "dim": 512,
        "arch": "ResNet-50",
        "sha256": "9f26bd4c848cc19b73d2ae92eea6e04886f61a7b764ceb7a13aeee62e6a6db56",
    },
    "sscd_disc_large": {
        "file": "sscd_disc_large.torchscript.pt",
        "dim": 1024,
        "arch": "ResNeXt-101",
        "sha256": None,
    },
    "sscd_imagenet_mixup": {
        "file": "sscd_imagenet_mixup.torchscript.pt",
        "dim": 512,
        "arch": "ResNet-50",
        "sha256": None,
    },
}
_BY_FILE = {v["file"]: k for k, v in KNOWN_MODELS.items()}


def verify_file(path: Path, expected: str | None, verify: bool = True, what: str = "weights") -> str:
    """Hex SHA256 of ``path``; raises DataError when ``verify`` and it differs from ``expected``
    (or when no digest is expected at all)."""
    actual = sha256_file(path)
    if not verify:
        return actual
    if not expected:
        raise DataError(
            f"{path}: no SHA256 is pinned for this {what} file (its digest is {actual}); "
            f"set sha256=<expected hex digest> from a source you trust, or verify=false to load it unverified"
        )
    expected = str(expected).strip().lower()
    if actual != expected:
        raise DataError(
            f"{path}: SHA256 mismatch: expected {expected}, actual {actual}; re-download the file, "
            f"fix the sha256 setting, or set verify=false to load it unverified"
        )
    return actual


class SSCDExtractor(Extractor):
    """A TorchScript copy-detection descriptor (SSCD or anything with its interface)."""

    family = "sscd"
    preprocess: Preprocess  # set in __init__
    default_model: str | None = None  # set by the named subclasses

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        model: str | None = None,
        cache_dir: str | None = None,
        sha256: str | None = None,
        verify: bool = True,
        preprocess: str | Mapping[str, Any] = "sscd_official",
        dim: int | None = None,
        device: str | torch.device = "auto",
        name: str | None = None,
    ) -> None:
        model = model if model is not None else self.default_model
        if model is not None and model not in KNOWN_MODELS:
            raise ConfigError(
                f"unknown SSCD model '{model}'.{did_you_mean(model, KNOWN_MODELS)} Known: {', '.join(KNOWN_MODELS)}"
            )
        if path is None:
            if model is None:
                raise ConfigError(
                    "sscd needs `path` (a TorchScript file) or `model` (one of "
                    f"{', '.join(KNOWN_MODELS)}) to look up under `cache_dir`"
                )
            cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "sscd"
            path = cache / KNOWN_MODELS[model]["file"]
        path = Path(path).expanduser()
        if model is None:
            model = _BY_FILE.get(path.name)  # a known file given by path: use its pin and dim
        known = KNOWN_MODELS.get(model, {}) if model else {}

        self.name = name or self.default_model or model or "sscd"
        self.model_key = model
        self.path = path
        self.device = resolve_device(device)
        self.preprocess = get_preprocess(preprocess)
        self.verify = bool(verify)
        self.expected_sha256 = (str(sha256).strip().lower() if sha256 else None) or known.get("sha256")

        if not path.is_file():
            what = f"SSCD weights '{known['file']}'" if known else "SSCD TorchScript file"
            raise DataError(
                f"{what} not found at {path}; download it yourself from the links in the README of "
                f"{SSCD_SOURCE} ({SSCD_LICENCE}-licensed; diffmem downloads nothing at run time) "
                "and set path=<file> (or put it under cache_dir)"
            )
        self.sha256 = verify_file(path, self.expected_sha256, self.verify, what="TorchScript")
        import torch

        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but it is SSCD's format
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(path), map_location=self.device)
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"{path}: cannot load as TorchScript: {first}") from err
        self.module.eval()

        expected_dim = dim if dim is not None else known.get("dim")
        self.dim = self._infer_dim()
        if expected_dim is not None and int(expected_dim) != self.dim:
            raise DataError(f"{path}: model outputs {self.dim}-d descriptors, expected {int(expected_dim)}")

    def _infer_dim(self) -> int:
        """Output size, from one forward pass of a grey image at the preprocessing size."""
        import torch

        h, w = self.preprocess.output_size(64, 64)
        probe = torch.full((1, 3, 64, 64), 0.5, device=self.device)
        with torch.no_grad():
            try:
                out = self.module(self.preprocess(probe))
            except Exception as err:  # noqa: BLE001
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise DataError(f"{self.path}: model fails on a [1, 3, {h}, {w}] input: {first}") from err
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"{self.path}: model must return a [B, D] tensor, returned {shape}")
        return int(out.shape[1])

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.preprocess(x))

    def weights_info(self) -> dict[str, Any]:
        return {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "expected_sha256": self.expected_sha256,
            "verified": self.verify,
            "licence": SSCD_LICENCE if self.model_key else None,
        }

    def _info_extra(self) -> dict[str, Any]:
        known = KNOWN_MODELS.get(self.model_key or "", {})
        return {"model": self.model_key, "arch": known.get("arch")}


class SSCDDiscMixup(SSCDExtractor):
    """``sscd_disc_mixup``: ResNet-50, 512-d, the SSCD authors' recommended default."""

    default_model = "sscd_disc_mixup"


class SSCDDiscLarge(SSCDExtractor):
    """``sscd_disc_large``: ResNeXt-101, 1024-d."""

    default_model = "sscd_disc_large"


class SSCDImagenetMixup(SSCDExtractor):
    """``sscd_imagenet_mixup``: ResNet-50 trained on ImageNet, 512-d."""

    default_model = "sscd_imagenet_mixup"
