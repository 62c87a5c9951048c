"""CLIP image descriptors via open_clip, strictly offline.

Weights come from one of (never downloaded):

- ``pretrained=random``: random initialisation (tests, smoke runs), only on request: unset
  weights are refused, and a random CLIP says so in its info and a warning (its vectors are
  no meaningful descriptor);
- ``pretrained=/path/to/checkpoint`` (``.safetensors``, or a torch file read with
  ``weights_only=True``);
- ``pretrained=<tag>`` (e.g. ``laion2b_s34b_b79k``): resolved only from the local
  Hugging Face cache (``HF_HUB_CACHE`` / ``cache_dir``) or open_clip's URL cache
  (``~/.cache/clip``); a DataError tells where to place the file when it is missing;
- ``arch="local-dir:/folder"``: an open_clip export (``open_clip_config.json`` and a
  weights file) in a local folder;
- ``arch="hf-hub:org/repo"``: such a repo, only if it is already in the HF cache.

Preprocessing mirrors open_clip's eval transform with torch ops: resize (short side to
the model's image size, bicubic by default, or as the checkpoint's preprocess config
says), centre crop, normalise with the model's mean/std. Output: ``encode_image``,
L2-normalised.

Config fields: ``arch``, ``pretrained``, ``cache_dir``, ``device``, ``precision``
(fp32 only on CPU), ``force_quick_gelu``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffmem.checks import did_you_mean
from diffmem.device import resolve_device
from diffmem.errors import ConfigError, DataError
from diffmem.features.base import Extractor, sha256_file
from diffmem.features.transforms import Preprocess

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
RANDOM_INIT = "randomly initialised CLIP — not a meaningful descriptor"
_RESIZE_MODES = {"shortest": "short", "squash": "square", "longest": "long"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hf_cached(repo_id: str, filenames: list[str], cache_dir: str | None) -> str | None:
    """Path of the first of ``filenames`` present in the local HF cache for ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _find_weights(folder: Path) -> str | None:
    """The weights file of an open_clip export folder (safetensors preferred), or None."""
    preferred = [
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "model.safetensors",
        "open_clip_pytorch_model.bin",
        "pytorch_model.bin",
        "open_clip_pytorch_model.pth",
        "model.pth",
    ]
    for name in preferred:
        if (folder / name).is_file():
            return str(folder / name)
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pth"))
    return str(found[0]) if found else None


def _require_weights(arch: str, pretrained: str | None) -> None:
    """Random weights only on request: refuse a CLIP without weights (``pretrained`` unset,
    and no ``local-dir:``/``hf-hub:`` arch, which brings its own)."""
    if pretrained in (None, "", "none") and not str(arch).startswith(("local-dir:", "hf-hub:")):
        raise ConfigError(
            "clip: no weights (pretrained is unset); pass features.extractor.pretrained="
            "<checkpoint file or cached tag>, or features.extractor.pretrained=random "
            "for a randomly initialised CLIP (not a meaningful descriptor)"
        )


def resolve_pretrained_tag(arch: str, tag: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """(local checkpoint path, open_clip pretrained cfg) of a pretrained tag, from caches only."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(
            f"clip pretrained '{tag}' is neither a file nor a known tag of '{arch}'.{did_you_mean(tag, tags)} "
            f"Known tags: {', '.join(tags) or 'none'}"
        )
    tried = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        found = _hf_cached(repo_id, names, cache_dir)
        if found:
            return found, cfg
        tried.append(f"HF cache repo {repo_id} ({', '.join(names)})")
    url = cfg.get("url", "")
    if url:
        folder = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "clip"
        candidate = folder / os.path.basename(url)
        if candidate.is_file():
            return str(candidate), cfg
        tried.append(str(candidate))
    raise DataError(
        f"clip weights '{arch}/{tag}' are not available locally (looked in: {'; '.join(tried)}); "
        "diffmem never downloads: download them on a machine with internet (e.g. "
        "huggingface-cli download) into the HF cache, or set pretrained=<local checkpoint file>"
    )


class ClipExtractor(Extractor):
    """open_clip ``encode_image`` descriptor."""

    family = "clip"
    preprocess: Preprocess  # set in __init__

    @classmethod
    def check_config(cls, fields: dict) -> None:
        _require_weights(fields.get("arch", "ViT-B-32"), fields.get("pretrained"))

    def __init__(
        self,
        arch: str = "ViT-B-32",
        pretrained: str | None = None,
        cache_dir: str | None = None,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        force_quick_gelu: bool = False,
        name: str = "clip",
    ) -> None:
        import open_clip

        _require_weights(arch, pretrained)
        self.name = name
        self.arch = arch
        self.pretrained = pretrained
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            precision = "fp32"
        self.precision = precision
        self.weights_path: str | None = None
        self.random_init = False
        kwargs: dict[str, Any] = dict(
            precision=precision, device=self.device, force_quick_gelu=bool(force_quick_gelu), weights_only=True
        )
        model_name = arch
        if arch.startswith("hf-hub:"):
            model_name = self._resolve_hub_dir(arch[len("hf-hub:") :], cache_dir)
        if model_name.startswith("local-dir:"):
            if pretrained:
                raise ConfigError("clip: `pretrained` is ignored with a 'local-dir:'/'hf-hub:' arch; leave it null")
            folder = Path(model_name[len("local-dir:") :]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise DataError(f"clip: {folder} has no open_clip_config.json (an open_clip export folder)")
            self.weights_path = _find_weights(folder)
            if self.weights_path is None:
                raise DataError(f"clip: {folder} has no weights file (*.safetensors, *.bin, *.pth)")
            model_name = f"local-dir:{folder}"
        elif open_clip.get_model_config(arch) is None:
            hint = did_you_mean(arch, open_clip.list_models(), n=3, cutoff=0.6)
            raise ConfigError(f"clip: unknown arch '{arch}'.{hint} (or use 'local-dir:<folder>')")
        elif pretrained == "random":
            self.random_init = True
        elif os.path.isfile(os.path.expanduser(str(pretrained))):
            self.weights_path = os.path.expanduser(str(pretrained))
        else:
            path, tag_cfg = resolve_pretrained_tag(arch, str(pretrained), cache_dir)
            self.weights_path = path
            if tag_cfg.get("quick_gelu"):
                kwargs["force_quick_gelu"] = True
            kwargs["force_preprocess_cfg"] = {
                k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
            }
        import logging

        level = logging.getLogger().level
        logging.getLogger().setLevel(max(level, logging.ERROR))  # "initialized randomly" warning
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected pickle protocol")  # a foreign pickle: the error says it
                torch.manual_seed(0)  # random-init weights (pretrained=random) are the same in every process
                model = open_clip.create_model(
                    model_name, pretrained=None if model_name.startswith("local-dir:") else self.weights_path, **kwargs
                )
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError) as err:
            why = (
                "a pickle that is not a plain tensor file (refused by weights_only, nothing run)"
                if isinstance(err, pickle.UnpicklingError)
                else _first_line(err)
            )
            raise DataError(f"clip: cannot build '{arch}' with weights {self.weights_path}: {why}") from err
        finally:
            logging.getLogger().setLevel(level)
        if self.random_init:
            log.warning("%s: %s (pretrained=random)", name, RANDOM_INIT)
        self.model = model.eval().requires_grad_(False)
        self._model_name = model_name
        self.sha256 = sha256_file(self.weights_path) if self.weights_path else None

        pcfg = getattr(self.model.visual, "preprocess_cfg", None) or {}
        size = pcfg.get("size", getattr(self.model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        resize_mode = pcfg.get("resize_mode", "shortest")
        self.preprocess = Preprocess(
            name=f"open_clip_{resize_mode}",
            resize=_RESIZE_MODES.get(resize_mode, "short"),
            size=size,
            crop=size,
            mean=tuple(pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(pcfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            interpolation=pcfg.get("interpolation", "bicubic"),
            fill=float(pcfg.get("fill_color", 0) or 0),
        )
        with torch.no_grad():
            probe = torch.zeros(1, 3, size, size, device=self.device)
            self.dim = int(self._encode(probe).shape[-1])

    @staticmethod
    def _resolve_hub_dir(repo_id: str, cache_dir: str | None) -> str:
        config = _hf_cached(repo_id, ["open_clip_config.json"], cache_dir)
        if config is None:
            raise DataError(
                f"clip: hf-hub repo '{repo_id}' is not in the local HF cache; diffmem never downloads: "
                "fetch it where there is internet or export it to a folder and use arch='local-dir:<folder>'"
            )
        return f"local-dir:{Path(config).parent}"

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.encode_image(x.to(dtype))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(self.preprocess(x))

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str] | np.ndarray) -> torch.Tensor:
        """L2-normalised ``encode_text`` features of ``captions`` (open_clip's bundled tokenizer;
        the text side of CLIPScore)."""
        import open_clip

        tokens = open_clip.get_tokenizer(self._model_name)(list(captions)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def weights_info(self) -> dict[str, Any] | None:
        if self.weights_path is None:
            return {"path": None, "sha256": None, "random_init": True, "warning": RANDOM_INIT}
        return {"path": str(Path(self.weights_path).resolve()), "sha256": self.sha256, "random_init": False}

    def _info_extra(self) -> dict[str, Any]:
        return {"arch": self.arch, "pretrained": self.pretrained, "precision": self.precision}


def export_local_clip(
    model: torch.nn.Module, folder: str | os.PathLike, model_cfg: dict, preprocess_cfg: dict | None = None
) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` folder (config JSON + safetensors)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
