"""Shared fixtures: a tiny seeded SD-style pipeline and a small testbed, both on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import diffmem  # noqa: F401 (arms the CPU torchvision shim before a test module imports open_clip)

CONF = Path(__file__).resolve().parent.parent / "conf"
# A small testbed for tests (the real one is data=testbed's defaults).
SMALL_DATA = [
    "data.root=${paths.data_dir}/testbed-small",
    "data.n_ordinary=24",
    "data.canaries_per_count=1",
    "data.canary_counts=[1,4]",
    "data.n_templates=1",
    "data.template_copies=3",
    "data.n_heldout=8",
]


def _cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "cache")


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test writes outputs and caches under its own temporary folders."""
    monkeypatch.setenv("DIFFMEM_OUTPUTS", str(tmp_path_factory.mktemp("outputs")))
    monkeypatch.setenv("DIFFMEM_CACHE", _cache_dir(tmp_path_factory))
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny pipeline saved in diffusers format (safetensors)."""
    from diffmem.models import save_pipeline
    from diffmem.models.testbed import build_testbed_pipeline

    arch = OmegaConf.load(CONF / "arch" / "tiny.yaml")
    pipe = build_testbed_pipeline(arch, seed=0)
    return save_pipeline(pipe, tmp_path_factory.mktemp("pipes") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipe_dir):
    from diffmem.models import load_pipeline

    return load_pipeline(tiny_pipe_dir)


@pytest.fixture(scope="session")
def small_testbed(tmp_path_factory):
    """(root, manifest) of a small generated testbed."""
    from diffmem.data.testbed import generate_testbed

    root = tmp_path_factory.mktemp("testbed")
    return root, generate_testbed(
        root, n_ordinary=24, canary_counts=(1, 4), canaries_per_count=1, n_templates=1, template_copies=3, n_heldout=8
    )


@pytest.fixture(scope="session")
def shipped_audit_outputs(tmp_path_factory) -> Path:
    """``diffmem audit`` with no arguments (the shipped testbed model), run once per session."""
    import os

    out = tmp_path_factory.mktemp("shipped-audit")
    env = {"DIFFMEM_OUTPUTS": str(out), "DIFFMEM_CACHE": _cache_dir(tmp_path_factory)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        diffmem.run("audit")
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return out


#: a small testbed embedded with 8x8 pixel descriptors in parts of 7 rows (index and search tests)
EMBED = [*SMALL_DATA, "features.extractor.size=8", "part_size=7"]


@pytest.fixture
def ref_dir():
    """An embed run of the small testbed's training images."""
    import diffmem

    return diffmem.run("embed", EMBED + ["split=train", "name=ref"])
