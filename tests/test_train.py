"""The train stage: trains, logs, checkpoints, and resumes exactly after a kill."""

from __future__ import annotations

import pandas as pd
import pytest
from safetensors.torch import load_file

import diffmem
from diffmem.errors import DataError
from tests.conftest import SMALL_DATA
from tests.reliability.test_bad_inputs import _Planted  # a pickle that would run code on load

ARGS = [
    "arch=tiny",
    "unet.steps=4",
    "unet.batch_size=4",
    "unet.lr=1e-3",
    "unet.ckpt_every=2",
    "vae.steps=2",
    "vae.batch_size=4",
    "vae.ckpt_every=1",
    *SMALL_DATA,
]


def _weights(model_dir):
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_train_from_scratch_writes_a_loadable_model():
    run_dir = diffmem.run("train", ARGS + ["name=a"])
    model = run_dir / "model"
    assert (model / "model_index.json").exists() and (run_dir / "_SUCCESS").exists()
    assert not (run_dir / "checkpoints").exists()  # only a resume needs them (keep_checkpoints=true keeps them)
    log = pd.read_parquet(run_dir / "train_log.parquet")
    assert set(log["phase"]) == {"vae", "unet"} and log["loss"].notna().all()
    from diffmem.models import load_pipeline

    pipe = load_pipeline(model)
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained VAE's latents


def test_resume_after_kill_is_exact(monkeypatch):
    full = diffmem.run("train", ARGS + ["name=full"])
    import diffmem.training as train

    calls = {"n": 0}
    real = train.step_generator

    def dying(seed, phase, step):  # simulate a kill after 3 UNet steps (checkpoint at 2)
        if phase == "unet":
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt
        return real(seed, phase, step)

    monkeypatch.setattr(train, "step_generator", dying)
    with pytest.raises(KeyboardInterrupt):
        diffmem.run("train", ARGS + ["name=killed"])
    monkeypatch.setattr(train, "step_generator", real)
    resumed = diffmem.run("train", ARGS + ["name=killed"])
    a, b = _weights(full / "model"), _weights(resumed / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
    log = pd.read_parquet(resumed / "train_log.parquet")
    assert log.groupby("phase")["step"].apply(lambda s: s.is_unique).all()
    # the logged means include the steps before the checkpoint it resumed from
    pd.testing.assert_frame_equal(log, pd.read_parquet(full / "train_log.parquet"))


def test_finished_run_is_a_noop():
    run_dir = diffmem.run("train", ARGS + ["name=b"])
    stamp = (run_dir / "model" / "model_index.json").stat().st_mtime_ns
    diffmem.run("train", ARGS + ["name=b"])
    assert (run_dir / "model" / "model_index.json").stat().st_mtime_ns == stamp


def test_fine_tune_existing_model(tiny_pipe_dir):
    run_dir = diffmem.run(
        "train",
        ["model=local", f"model.path={tiny_pipe_dir}", "unet.steps=2", "unet.batch_size=2", *SMALL_DATA, "name=ft"],
    )
    before, after = _weights(tiny_pipe_dir), _weights(run_dir / "model")
    assert any((before[k] != after[k]).any() for k in before)


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("file,caption\n")
    with pytest.raises(DataError, match="m.csv: the manifest has no rows"):
        diffmem.run(
            "train", ["arch=tiny", "data=folder", f"data.root={tmp_path}", "data.manifest=m.csv", "data.resolution=32"]
        )


def test_lr_schedule_is_a_function_of_the_step():
    from diffmem.training import _lr_factor

    assert _lr_factor(0, 10, 4, None) == 0.25 and _lr_factor(3, 10, 4, None) == 1.0
    assert _lr_factor(9, 10, 4, None) == 1.0
    assert _lr_factor(5, 10, 0, 6) == 1.0  # before the decay
    assert _lr_factor(6, 10, 0, 6) == 1.0 and _lr_factor(8, 10, 0, 6) == 0.5
    assert _lr_factor(9, 10, 0, 6) == 0.25


def test_noised_follows_the_latents_dtype():
    """A half-precision UNet gets half-precision inputs: noise and x_t in the latents' dtype."""
    import torch
    from diffusers import DDPMScheduler

    from diffmem.training import noised

    sched = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.randn(2, 4, 8, 8).to(torch.bfloat16)
    xt, t, target = noised(sched, x0, torch.Generator().manual_seed(0))
    assert xt.dtype == target.dtype == torch.bfloat16 and t.device == x0.device
    xt32, t32, target32 = noised(sched, x0.float(), torch.Generator().manual_seed(0))
    assert torch.equal(t, t32) and xt32.dtype == torch.float32  # the same draws in any dtype
    assert torch.equal(target, target32.to(torch.bfloat16))


# -- damaged checkpoints: the newest readable one is used, a damaged one removed with a warning ----


def _fit(ckpt_dir, steps: int = 4):
    import torch

    from diffmem.training import fit

    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    x = torch.randn(8, 3)
    losses = fit(
        module,
        lambda step, g: module(x[torch.randint(8, (4,), generator=g)]).pow(2).mean(),
        steps=steps,
        lr=1e-2,
        seed=0,
        phase="unit",
        ckpt_dir=ckpt_dir,
        ckpt_every=2,
        log_every=1,
    )
    return module.state_dict(), losses


def _pickle(path):
    import pickle

    path.write_bytes(pickle.dumps(_Planted()))


DAMAGES = {
    "optimizer-is-a-pickle": ("optimizer.pt", _pickle),
    "truncated-model": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:50])),
    "truncated-state": ("state.json", lambda p: p.write_text(p.read_text()[:20])),
    "state-of-another-step": ("state.json", lambda p: p.write_text('{"step": 2, "losses": []}')),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, monkeypatch, caplog, damage):
    """A killed run whose newest checkpoint is damaged resumes from the one before, with one
    warning line naming the file, and ends where an undisturbed run ends; no code is run."""
    monkeypatch.chdir(tmp_path)
    want, want_losses = _fit(tmp_path / "full")
    _fit(tmp_path / "ckpt")  # as if killed right after the step-4 checkpoint was written
    name, spoil = DAMAGES[damage]
    spoil(tmp_path / "ckpt" / "step-0000004" / name)
    caplog.set_level("WARNING")
    got, losses = _fit(tmp_path / "ckpt")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert str(tmp_path / "ckpt" / "step-0000004" / name) in warned[0] and "resuming from step-0000002" in warned[0]
    assert not (tmp_path / "planted-pickle-ran").exists()
    assert losses == want_losses and all((got[k] == want[k]).all() for k in want)
    caplog.clear()
    _fit(tmp_path / "ckpt")  # the damaged checkpoint was replaced: no warning any more
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_all_checkpoints_damaged_starts_from_scratch(tmp_path, caplog):
    want, _ = _fit(tmp_path / "full")
    _fit(tmp_path / "ckpt")
    for step in ("step-0000002", "step-0000004"):
        _pickle(tmp_path / "ckpt" / step / "optimizer.pt")
    caplog.set_level("WARNING")
    got, _ = _fit(tmp_path / "ckpt")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("starting from scratch" in w for w in warned), warned
    assert all((got[k] == want[k]).all() for k in want)
