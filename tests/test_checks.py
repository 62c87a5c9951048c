"""Config checks, "did you mean" hints and the registry's type check."""

from __future__ import annotations

import pytest

from diffmem.checks import check_float, check_int, check_positive, check_shard, did_you_mean
from diffmem.errors import ConfigError
from diffmem.features import FEATURES, Extractor
from diffmem.registry import Registry


def test_checks_return_values_and_name_the_field():
    assert check_positive(3, "steps") == 3 and check_positive(2.0, "steps") == 2
    assert check_positive(None, "limit", optional=True) is None
    assert check_int(0, "step", 0) == 0 and check_float("0.5", "lr", 0.0) == 0.5
    assert check_shard(1, 2) == (1, 2)
    for call, msg in [
        (lambda: check_positive(-3, "steps"), r"^steps must be >= 1 \(got -3\)$"),
        (lambda: check_positive(0, "limit", optional=True), r"^limit must be >= 1 or null"),
        (lambda: check_positive(True, "k"), "k must be an integer"),
        (lambda: check_positive(2.5, "k"), "k must be an integer"),
        (lambda: check_float(float("nan"), "lr", 0.0), "lr must be a finite number"),
        (lambda: check_shard(2, 2), r"shard must be in \[0, num_shards\) \(got 2 of 2\)"),
        (lambda: check_shard(0, 0), "num_shards must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            call()


def test_check_float_bounds_and_finiteness():
    assert check_float(0.5, "p", 0.0, 1.0) == 0.5 and check_float(None, "decay", optional=True) is None
    for value, kw, msg in [
        (float("inf"), {}, r"^x must be a finite number \(got inf\)$"),
        (1.5, dict(minimum=0.0, maximum=1.0), r"^x must be a finite number >= 0.0 and <= 1.0"),
        (0.0, dict(above=0.0), r"^x must be a finite number > 0.0 \(got 0.0\)$"),
        (True, {}, "x must be a number"),
        ("abc", {}, "x must be a number"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            check_float(value, "x", **kw)


def test_check_device_names_what_this_machine_lacks():
    import torch

    from diffmem.device import check_device

    assert check_device("auto") == "auto" and check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"^device='foo' is not a device"):
        check_device("foo")
    with pytest.raises(ConfigError, match=r"^features.extractor.device='cpu:1' is not a device"):
        check_device("cpu:1", "features.extractor.device")
    with pytest.raises(ConfigError, match=r"^device=cuda:99: this machine has \d+ CUDA device"):
        check_device("cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^device=cuda: this machine has 0 CUDA devices"):
            check_device("cuda")


def test_did_you_mean():
    assert did_you_mean("pixle", ["pixel", "clip"]) == " Did you mean 'pixel'?"
    assert did_you_mean("siez", ["size", "grayscale"], paren=True) == " (did you mean 'size'?)"
    assert did_you_mean("zzz", ["pixel"]) == ""


def test_registry_type_checks_what_it_returns():
    reg = Registry("features", expects=Extractor)
    reg.register("pixel", "diffmem.features.pixel:PixelExtractor")
    reg.register("bad", "diffmem.checks:check_int")
    assert issubclass(reg.get("pixel"), Extractor)
    with pytest.raises(ConfigError, match="features 'bad' is registered as .*not a subclass of Extractor"):
        reg.get("bad")
    calls = Registry("probe", expects=callable)
    calls.register("none", 3)
    with pytest.raises(ConfigError, match="probe 'none' is registered as 3, which is not callable"):
        calls.get("none")
    with pytest.raises(ConfigError, match="unknown features 'pixle'. Did you mean 'pixel'"):
        FEATURES.get("pixle")
