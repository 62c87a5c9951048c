"""Datasets, the testbed generator and prompt-list loaders, including malformed input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmem.data import load_image, load_images, read_prompt_file
from diffmem.data.datasets import load_folder_manifest
from diffmem.data.prompts import prompts_from_testbed
from diffmem.data.testbed import generate_testbed
from diffmem.errors import DataError


def test_testbed_counts_and_ground_truth(small_testbed):
    root, df = small_testbed
    canary = df[df.kind == "canary"]
    assert sorted(canary.groupby("group").size().tolist()) == [1, 4]
    assert (canary.groupby("group")["dup_count"].first() == canary.groupby("group").size()).all()
    assert canary.groupby("group")["file"].nunique().eq(1).all()  # copies share one image
    tmpl = df[df.kind == "template"]
    assert tmpl["caption"].nunique() == 1 and tmpl["file"].nunique() == 3  # details vary
    assert (df[df.kind == "heldout"]["split"] == "heldout").all()
    assert df["image_id"].is_unique
    img = load_image(root / df["file"].iloc[0])
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


def test_testbed_is_deterministic(tmp_path, small_testbed):
    _, df = small_testbed
    again = generate_testbed(
        tmp_path,
        n_ordinary=24,
        canary_counts=(1, 4),
        canaries_per_count=1,
        n_templates=1,
        template_copies=3,
        n_heldout=8,
    )
    pd.testing.assert_frame_equal(df, again)
    root = small_testbed[0]
    for f in df["file"].unique()[:10]:
        assert np.array_equal(load_image(root / f), load_image(tmp_path / f))


def test_testbed_prompts_cover_canaries(small_testbed):
    _, df = small_testbed
    p = prompts_from_testbed(df, n_ordinary=4, n_heldout=4)
    assert set(df.loc[df.kind.isin(["canary", "template"]), "caption"]) <= set(p.caption)
    held = p[p.kind == "heldout"]
    assert not held.caption.isin(df.loc[df.split == "train", "caption"]).any()
    assert list(p.prompt_id) == list(range(len(p)))


def _folder(tmp_path, n=3):
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_folder_manifest_formats(tmp_path, suffix):
    _folder(tmp_path)
    df = pd.DataFrame({"file": ["0.png", "1.png", "2.png"], "caption": ["a", "b", "c"]})
    path = tmp_path / f"m.{suffix}"
    {
        "csv": lambda: df.to_csv(path, index=False),
        "jsonl": lambda: path.write_text("\n".join(json.dumps(r) for r in df.to_dict("records"))),
        "parquet": lambda: df.to_parquet(path),
    }[suffix]()
    out = load_folder_manifest(tmp_path, path.name)
    assert out["caption"].tolist() == ["a", "b", "c"] and out["image_id"].is_unique
    images = load_images(tmp_path, out["file"], resolution=16)
    assert images.shape == (3, 16, 16, 3)


def test_folder_manifest_missing_image_names_row(tmp_path):
    _folder(tmp_path, 1)
    (tmp_path / "m.csv").write_text("file,caption\n0.png,a\nnope.png,b\n")
    with pytest.raises(DataError, match=r"m.csv: row 2: image 'nope.png' not found"):
        load_folder_manifest(tmp_path, "m.csv")


def test_folder_manifest_missing_caption_column(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\n0.png,a\n")
    with pytest.raises(DataError, match="no caption column"):
        load_folder_manifest(tmp_path, "m.csv")


def test_folder_without_manifest_lists_its_images(tmp_path):
    """data=folder without a manifest: every image under root (nested, sorted; hidden files,
    hidden folders and other files left out), uncaptioned; only for stages that need no captions."""
    import os

    from omegaconf import OmegaConf

    from diffmem.data import load_dataset
    from diffmem.errors import ConfigError

    _folder(tmp_path, 2)
    (tmp_path / "sub" / ".cache").mkdir(parents=True)
    for name in ("sub/b.JPG", "sub/.c.png", "sub/.cache/d.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name, format="PNG")
    (tmp_path / "captions.txt").write_text("not an image list")
    cfg = OmegaConf.create({"kind": "folder", "root": str(tmp_path), "manifest": None})
    root, df = load_dataset(cfg, captions=False)
    assert df["file"].tolist() == ["0.png", "1.png", "sub/b.JPG"] and df["caption"].isna().all()
    assert df["image_id"].is_unique and root == tmp_path
    with pytest.raises(ConfigError, match=r"data.manifest is required.*embed and dedup"):
        load_dataset(cfg)  # a stage that needs captions
    outside = tmp_path.parent / f"{tmp_path.name}-out.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    os.symlink(outside, tmp_path / "link.png")
    with pytest.raises(DataError, match="link.png"):  # leads outside root
        load_dataset(cfg, captions=False)
    empty = tmp_path / "sub" / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset(OmegaConf.merge(cfg, {"root": str(empty)}), captions=False)
    with pytest.raises(DataError, match="no such folder"):
        load_dataset(OmegaConf.merge(cfg, {"root": str(tmp_path / "nope")}), captions=False)


def test_corrupt_and_odd_images(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="bad.png: corrupt or unreadable image"):
        load_image(tmp_path / "bad.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    Image.new("L", (4, 4), 7).save(tmp_path / "g.png")
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "a.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "g.png")[0, 0].tolist() == [7, 7, 7]
    assert load_image(tmp_path / "a.png")[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert load_image(tmp_path / "c.jpg").shape == (4, 4, 3)


def test_prompt_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert read_prompt_file(tmp_path / "p.txt")["caption"].tolist() == ["first prompt", "second prompt"]
    (tmp_path / "p.jsonl").write_text(
        '{"caption": "x", "index": 5, "url": "u"}\n{"caption": "y", "index": 6, "url": "v"}\n'
    )
    j = read_prompt_file(tmp_path / "p.jsonl")
    assert j["caption"].tolist() == ["x", "y"] and j["index"].tolist() == [5, 6] and "url" in j
    (tmp_path / "p.csv").write_text(
        ";Caption;URL;type;mean_sscd;max_sscd;Index\n0;a cat;u;VM;0.8;0.9;1\n1;a dog;v;TM;;;2\n"
    )
    c = read_prompt_file(tmp_path / "p.csv")
    assert c["caption"].tolist() == ["a cat", "a dog"] and c["type"].tolist() == ["VM", "TM"]
    assert c["max_sscd"].iloc[0] == 0.9 and np.isnan(c["max_sscd"].iloc[1])
    (tmp_path / "nonmem.csv").write_text(";Caption;URL;Index\n0;a tree;u;3\n")
    assert read_prompt_file(tmp_path / "nonmem.csv")["caption"].tolist() == ["a tree"]
    (tmp_path / "list.data").write_text('{"caption": "z"}\n')
    assert read_prompt_file(tmp_path / "list.data", fmt="jsonl")["caption"].tolist() == ["z"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"caption": "ok"}\n{"caption": broken\n', r"bad.jsonl:2: invalid JSON"),
        ("list.jsonl", '["not", "an", "object"]\n', r"list.jsonl:1: expected a JSON object"),
        ("nocap.jsonl", '{"text2": "x"}\n', r"nocap.jsonl: no 'caption' column"),
        ("empty.txt", "\n\n", r"empty.txt: the prompt list is empty"),
        ("blank.csv", "Caption;type\nok;VM\n;TM\n", r"blank.csv: line 3: empty caption"),
        ("nocol.csv", "Prompt2;type\nx;VM\n", r"nocol.csv: no 'caption' column"),
    ],
)
def test_malformed_prompt_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompt_file(tmp_path / name)


def test_prompt_file_bad_encoding_and_missing(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt: not UTF-8"):
        read_prompt_file(tmp_path / "latin.txt")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_prompt_file(tmp_path / "nope.jsonl")


def test_testbed_root_with_other_parameters_is_refused(small_testbed):
    root, _ = small_testbed
    with pytest.raises(DataError, match="holds a testbed generated with other parameters"):
        generate_testbed(
            root,
            n_ordinary=25,
            canary_counts=(1, 4),
            canaries_per_count=1,
            n_templates=1,
            template_copies=3,
            n_heldout=8,
        )


def _subset(size, part, kinds=("ordinary",), seed=0):
    return {"kinds": None if kinds is None else list(kinds), "size": size, "part": part, "seed": seed}


def test_subset_parts_are_disjoint_seeded_and_sized(small_testbed):
    from diffmem.data import select_subset

    _, df = small_testbed
    assert select_subset(df, None) is df  # data.subset: null keeps the whole set
    a, b = select_subset(df, _subset(12, 0)), select_subset(df, _subset(12, 1))
    assert len(a) == len(b) == 12 and (a.kind == "ordinary").all() and (b.kind == "ordinary").all()
    assert not set(a.file) & set(b.file) and set(a.file) | set(b.file) == set(df[df.kind == "ordinary"].file)
    pd.testing.assert_frame_equal(a, select_subset(df, _subset(12, 0)))  # deterministic
    assert set(select_subset(df, _subset(12, 0, seed=1)).file) != set(a.file)
    # duplicated images: parts split images, never the copies of one image
    canary = select_subset(df, _subset(1, 0, kinds=["canary"]))
    assert canary.file.nunique() == 1 and len(canary) == canary.dup_count.iloc[0]


def test_subset_errors_name_the_field(small_testbed):
    from diffmem.data import select_subset
    from diffmem.errors import ConfigError

    _, df = small_testbed
    with pytest.raises(
        ConfigError,
        match=r"^data.subset.size: two disjoint parts of 13 images need 26, "
        r"the dataset has 24 ordinary images$",
    ):
        select_subset(df, _subset(13, 1))
    with pytest.raises(ConfigError, match="^data.subset.part must be 0 or 1"):
        select_subset(df, _subset(2, 2))
    with pytest.raises(ConfigError, match="^data.subset.kinds: the dataset has no 'kind' column"):
        select_subset(df.drop(columns="kind"), _subset(2, 0))


def test_bom_is_stripped_from_prompt_lists_and_manifests(tmp_path):
    bom = "\ufeff"
    (tmp_path / "p.txt").write_text(bom + "a cat\na dog\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(bom + '{"caption": "a cat"}\n', encoding="utf-8")
    (tmp_path / "p.csv").write_text(bom + "Caption;type\na cat;VM\n", encoding="utf-8")
    for name in ("p.txt", "p.jsonl", "p.csv"):
        assert read_prompt_file(tmp_path / name)["caption"].iloc[0] == "a cat", name
    _folder(tmp_path, 1)
    (tmp_path / "m.csv").write_text(bom + "file,caption\n0.png,a\n", encoding="utf-8")
    assert load_folder_manifest(tmp_path, "m.csv")["file"].tolist() == ["0.png"]


def test_images_outside_root_only_when_allowed(tmp_path):
    (tmp_path / "root").mkdir()
    root = _folder(tmp_path / "root", 1)
    Image.new("RGB", (4, 4)).save(tmp_path / "out.png")
    (root / "m.csv").write_text("file,caption\n0.png,a\n../out.png,b\n")
    with pytest.raises(DataError, match=r"row 2: image '../out.png' is outside data.root"):
        load_folder_manifest(root, "m.csv")
    assert load_folder_manifest(root, "m.csv", allow_outside_root=True)["file"].tolist() == ["0.png", "../out.png"]


def test_pixel_budget_is_checked_before_decoding(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=200).shape == (10, 20, 3)
    with pytest.raises(DataError, match=r"big.png: a 20x10 image is over the pixel budget data.max_pixels=199"):
        load_image(tmp_path / "big.png", max_pixels=199)


def test_long_prompts_warn_once_with_the_count(caplog):
    from diffmem.data.prompts import warn_long_prompts

    class Tokenizer:  # one token per word, as a stand-in for the pipeline's CLIP tokenizer
        model_max_length = 4

        def __call__(self, captions, truncation, verbose):
            return {"input_ids": [c.split() for c in captions]}

    with caplog.at_level("WARNING"):
        n = warn_long_prompts(["a b c", "a b c d e", "a b c d e f g", "a"], Tokenizer())
    assert n == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "2 of 4 prompts are longer than the tokenizer's 4 tokens" in lines[0]
