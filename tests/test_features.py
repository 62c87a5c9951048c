"""Descriptor registry: pixel, sscd (TorchScript path), clip (offline), preprocessing."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffmem.errors import ConfigError, DataError
from diffmem.features import FEATURES, build_extractor
from diffmem.features.transforms import IMAGENET_MEAN, IMAGENET_STD, PRESETS, get_preprocess


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI box has 2 cores shared with other jobs: one torch thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [0, 1]: upsampled low-resolution noise (image-like structure)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


# ---------------------------------------------------------------------------------------
# registry / build_extractor


def test_registry_lists_the_extractors():
    for name in ("pixel", "sscd", "sscd_disc_mixup", "sscd_disc_large", "sscd_imagenet_mixup", "clip"):
        assert name in FEATURES


def test_unknown_name_suggests_close_name():
    with pytest.raises(ConfigError, match=r"(?i)did you mean 'pixel'"):
        build_extractor("pixle")
    with pytest.raises(ConfigError, match="sscd_disc_mixup"):
        build_extractor({"name": "sscd_disk_mixup"})


def test_unknown_field_and_missing_name_are_config_errors():
    with pytest.raises(ConfigError, match=r"did you mean 'size'"):
        build_extractor("pixel", sise=8)
    with pytest.raises(ConfigError, match="needs a `name`"):
        build_extractor({"size": 8})


def test_build_from_dictconfig_with_overrides():
    from omegaconf import OmegaConf

    ext = build_extractor(OmegaConf.create({"name": "pixel", "size": 8, "_target_": "ignored"}), grayscale=True)
    assert (ext.name, ext.dim) == ("pixel", 64)
    assert json.loads(json.dumps(ext.info()))["preprocessing"]["size"] == 8


# ---------------------------------------------------------------------------------------
# pixel


def test_pixel_shape_and_normalisation():
    ext = build_extractor("pixel")
    out = ext(smooth_images(3, 40))
    assert out.shape == (3, 16 * 16 * 3) and out.dtype == torch.float32 and ext.dim == out.shape[1]
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert build_extractor("pixel", size=8, grayscale=True)(smooth_images(2)).shape == (2, 64)


def test_pixel_identical_vs_shifted_vs_different():
    ext = build_extractor("pixel", size=16)
    x = smooth_images(2, 64, seed=1)
    a = ext(x[:1])
    assert cos(a, ext(x[:1].clone())).item() == pytest.approx(1.0, abs=1e-5)
    shifted = torch.roll(x[:1], shifts=(10, 10), dims=(2, 3))
    s_shift = cos(a, ext(shifted)).item()
    s_diff = cos(a, ext(x[1:])).item()
    assert s_shift < 0.95
    assert s_diff < 0.95


def test_pixel_mean_subtraction_gives_brightness_invariance():
    x = smooth_images(1, 32, seed=2) * 0.5
    brighter = x + 0.45  # stays inside [0, 1]
    ext = build_extractor("pixel")
    assert cos(ext(x), ext(brighter)).item() == pytest.approx(1.0, abs=1e-5)
    raw = build_extractor("pixel", center=False)  # without centring the offset matters
    assert cos(raw(x), raw(brighter)).item() < 0.98


def test_pixel_embed_pil_matches_tensor_path():
    from PIL import Image

    x = smooth_images(2, 24, seed=3)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    ims = [Image.fromarray(a) for a in arr] + [Image.fromarray(arr[0]).resize((40, 30))]
    ext = build_extractor("pixel", size=8)
    out = ext.embed_pil(ims)
    assert out.shape == (3, 192)
    ref = ext(torch.from_numpy(arr).permute(0, 3, 1, 2))  # uint8 is accepted and scaled
    assert torch.allclose(out[:2], ref, atol=1e-5)


def test_images_outside_unit_range_are_rejected():
    ext = build_extractor("pixel")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        ext(smooth_images(1) * 2 - 1)
    with pytest.raises(DataError, match=r"\[B, 3, H, W\]"):
        ext(torch.rand(2, 4, 8, 8))


# ---------------------------------------------------------------------------------------
# preprocessing presets


@pytest.mark.parametrize(
    "name,out_hw,lo,hi",
    [
        ("sscd_official", (288, 384), None, None),
        ("dcr", (224, 224), -1.0, 1.0),
        ("nemo", (320, 320), None, None),
    ],
)
def test_preprocess_presets_shape_and_statistics(name, out_hw, lo, hi):
    pre = get_preprocess(name)
    x = torch.rand(2, 3, 150, 200)
    y = pre(x)
    assert tuple(y.shape) == (2, 3, *out_hw)
    assert pre.output_size(150, 200) == out_hw
    mean = torch.tensor(PRESETS[name]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PRESETS[name]["std"]).view(1, 3, 1, 1)
    if lo is not None:
        assert float(y.min()) >= lo - 1e-6 and float(y.max()) <= hi + 1e-6
        assert float(y.min()) < -0.9 and float(y.max()) > 0.9  # really spans [-1, 1]
    # an image equal to the mean maps to 0; 0 and 1 map to -mean/std and (1-mean)/std
    flat = mean.expand(1, 3, 150, 200)
    assert pre(flat).abs().max() < 1e-5
    assert torch.allclose(
        pre(torch.zeros(1, 3, 64, 64)), (-mean / std).expand(1, 3, *pre.output_size(64, 64)), atol=1e-5
    )


def test_imagenet_statistics_in_presets():
    assert PRESETS["sscd_official"]["mean"] == IMAGENET_MEAN and PRESETS["nemo"]["std"] == IMAGENET_STD
    assert PRESETS["dcr"]["mean"] == (0.5, 0.5, 0.5) and PRESETS["dcr"]["std"] == (0.5, 0.5, 0.5)


def test_resize_and_crop_match_torchvision_tensor_ops():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(1, 3, 150, 201)
    got = get_preprocess({"preset": "dcr", "mean": 0.0, "std": 1.0})(x)
    want = TF.center_crop(TF.resize(x, 256, antialias=True), 224)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    got = get_preprocess({"preset": "sscd_official", "mean": 0.0, "std": 1.0})(x)
    want = TF.resize(x, 288, antialias=True)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def test_unknown_preprocess_suggests_preset():
    with pytest.raises(ConfigError, match="(?i)did you mean 'nemo'"):
        get_preprocess("nemoo")


# ---------------------------------------------------------------------------------------
# sscd through a tiny TorchScript file with SSCD's interface


class TinySSCD(nn.Module):
    """[B, 3, H, W] normalised images -> [B, dim] (not normalised: the extractor must do it)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return 3.0 * self.fc(h) + 1.0


def save_tiny(path, dim: int = 16, seed: int = 0):
    from diffmem.features.base import sha256_file

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # torch.jit is deprecated, but it is SSCD's distribution format
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(TinySSCD(dim).eval())
        torch.jit.save(module, str(path))
    return module, sha256_file(path)


@pytest.fixture
def tiny_sscd(tmp_path):
    path = tmp_path / "tiny.torchscript.pt"
    module, digest = save_tiny(path)
    return path, module, digest


def test_sscd_loads_pinned_file_and_normalises(tiny_sscd):
    path, module, digest = tiny_sscd
    ext = build_extractor("sscd", path=str(path), sha256=digest, preprocess="dcr", device="cpu")
    x = smooth_images(3, 48)
    out = ext(x)
    assert out.shape == (3, 16) and ext.dim == 16 and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        want = F.normalize(module(ext.preprocess(x)), dim=1)
    assert torch.allclose(out, want, atol=1e-5)
    info = json.loads(json.dumps(ext.info()))
    assert info["weights"]["sha256"] == digest and info["weights"]["verified"] is True
    assert info["preprocessing"]["name"] == "dcr" and info["preprocessing"]["crop"] == 224
    assert info["dim"] == 16


@pytest.mark.parametrize("variant", ["sscd_official", "dcr", "nemo"])
def test_sscd_preprocess_variant_is_used_and_recorded(tiny_sscd, variant):
    path, module, digest = tiny_sscd
    ext = build_extractor("sscd", path=str(path), sha256=digest, preprocess=variant, device="cpu")
    assert ext.info()["preprocessing"]["name"] == variant
    x = smooth_images(1, 40, seed=5)
    with torch.no_grad():
        want = F.normalize(module(get_preprocess(variant)(x)), dim=1)
    assert torch.allclose(ext(x), want, atol=1e-5)


def test_sscd_wrong_sha256_is_a_data_error(tiny_sscd):
    path, _, digest = tiny_sscd
    with pytest.raises(DataError) as err:
        build_extractor("sscd", path=str(path), sha256="0" * 64, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert digest in msg and "0" * 64 in msg and "verify=false" in msg


def test_sscd_verify_false_loads_anyway(tiny_sscd):
    path, _, digest = tiny_sscd
    ext = build_extractor("sscd", path=str(path), sha256="0" * 64, verify=False, device="cpu")
    assert ext(smooth_images(2)).shape == (2, 16)
    assert ext.info()["weights"]["verified"] is False and ext.info()["weights"]["sha256"] == digest


def test_sscd_without_expected_digest_refuses_unless_verify_false(tiny_sscd):
    path, _, digest = tiny_sscd
    with pytest.raises(DataError, match=digest):
        build_extractor("sscd", path=str(path), device="cpu")
    assert build_extractor("sscd", path=str(path), verify=False, device="cpu").dim == 16


def test_sscd_missing_file_names_path_source_and_licence(tmp_path):
    with pytest.raises(DataError) as err:
        build_extractor("sscd_disc_mixup", cache_dir=str(tmp_path), device="cpu")
    msg = str(err.value)
    assert str(tmp_path / "sscd_disc_mixup.torchscript.pt") in msg
    assert "facebookresearch/sscd-copy-detection" in msg and "MIT" in msg
    with pytest.raises(DataError, match="nothere.pt"):
        build_extractor("sscd", path=str(tmp_path / "nothere.pt"), device="cpu")


def test_sscd_known_name_uses_its_pinned_digest(tmp_path):
    from diffmem.features.sscd import KNOWN_MODELS

    pinned = KNOWN_MODELS["sscd_disc_mixup"]["sha256"]
    save_tiny(tmp_path / "sscd_disc_mixup.torchscript.pt", dim=512)
    with pytest.raises(DataError, match=pinned):  # our tiny file is not the published one
        build_extractor("sscd_disc_mixup", cache_dir=str(tmp_path), device="cpu")


def test_sscd_named_model_checks_dim_and_finds_file_in_cache_dir(tmp_path):
    _, digest = save_tiny(tmp_path / "sscd_disc_large.torchscript.pt", dim=1024)
    ext = build_extractor("sscd_disc_large", cache_dir=str(tmp_path), sha256=digest, device="cpu")
    assert ext.name == "sscd_disc_large" and ext.dim == 1024
    assert ext.info()["preprocessing"]["name"] == "sscd_official"
    assert ext(smooth_images(1)).shape == (1, 1024)
    _, digest = save_tiny(tmp_path / "sscd_imagenet_mixup.torchscript.pt", dim=16)
    with pytest.raises(DataError, match="expected 512"):
        build_extractor("sscd_imagenet_mixup", cache_dir=str(tmp_path), sha256=digest, device="cpu")


def test_sscd_non_torchscript_file_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="cannot load as TorchScript"):
        build_extractor("sscd", path=str(bad), verify=False, device="cpu")


# ---------------------------------------------------------------------------------------
# clip (open_clip, offline)


def test_clip_random_init_runs_on_small_batch():
    import open_clip

    ext = build_extractor("clip", arch="ViT-S-32", pretrained="random", device="cpu")
    out = ext(torch.rand(2, 3, 32, 32))
    assert ext.dim == open_clip.get_model_config("ViT-S-32")["embed_dim"]
    assert out.shape == (2, ext.dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    info = ext.info()
    assert info["weights"]["random_init"] is True
    assert info["weights"]["warning"] == "randomly initialised CLIP — not a meaningful descriptor"
    assert info["preprocessing"]["size"] == 224 and info["preprocessing"]["crop"] == 224


@pytest.mark.parametrize("pretrained", [None, "", "none"])
def test_clip_without_weights_is_refused(pretrained):
    """Random weights only on request: unset weights are a one-line error saying how to ask."""
    with pytest.raises(ConfigError, match="pretrained=random") as err:
        build_extractor("clip", arch="ViT-S-32", pretrained=pretrained, device="cpu")
    assert "\n" not in str(err.value)


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def test_clip_local_dir_export_loads_same_weights(tmp_path):
    from open_clip.model import CLIP

    from diffmem.features.clip import export_local_clip

    torch.manual_seed(0)
    model = CLIP(**TINY_CLIP).eval()
    folder = export_local_clip(
        model, tmp_path / "tinyclip", TINY_CLIP, {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    )
    ext = build_extractor("clip", arch=f"local-dir:{folder}", device="cpu")
    assert ext.dim == 16 and ext.preprocess.mean == (0.5, 0.5, 0.5)
    x = smooth_images(2, 48)
    with torch.no_grad():
        want = F.normalize(model.encode_image(ext.preprocess(x)), dim=1)
    assert torch.allclose(ext(x), want, atol=1e-5)
    assert ext.info()["weights"]["sha256"] is not None


def test_clip_pretrained_tag_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not available locally"):
        build_extractor("clip", arch="ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path), device="cpu")
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):
        build_extractor("clip", arch="ViT-B-32", pretrained="laion2b_s34b_b79", device="cpu")


@pytest.mark.parametrize("size", [(5, 7), (12, 3), (9, 9), 4])
def test_center_crop_array_equals_the_tensor_crop(size):
    """The uint8 path's crop / pad (``Preprocess.finish_uint8``) takes the float path's pixels."""
    from diffmem.features.transforms import center_crop, center_crop_array

    x = np.random.default_rng(0).integers(0, 255, (8, 6, 3), dtype=np.uint8)
    want = center_crop(torch.from_numpy(x).permute(2, 0, 1)[None].float(), size, fill=7.0)[0]
    assert np.array_equal(center_crop_array(x, size, fill=7), want.permute(1, 2, 0).numpy().astype(np.uint8))


@pytest.mark.parametrize("resize", ["short", "square", "long", "none"])
def test_resize_size_then_finish_gives_output_size(resize):
    from diffmem.features.transforms import Preprocess

    pre = Preprocess(resize=resize, size=16, crop=12 if resize == "short" else None)
    for h, w in [(30, 50), (50, 30), (20, 20)]:
        rh, rw = pre.resize_size(h, w)
        out = pre.finish_uint8(np.zeros((rh, rw, 3), np.uint8))
        assert out.shape[:2] == pre.output_size(h, w)
        assert tuple(pre.resize_only(torch.zeros(1, 3, h, w)).shape[-2:]) == (
            (rh, rw) if resize != "long" else (16, 16)
        )
