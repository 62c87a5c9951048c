"""Bring your own data: public prompt-list formats and schemas mapped to one ground truth, the
audit on a folder of real photos with nothing but model/data, and detect / probe /
evaluate-mitigation driven by prompt lists."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pandas as pd
import pytest

import diffmem
from diffmem.data import read_prompt_file
from diffmem.data.labels import ground_truth_labels
from diffmem.data.prompts import read_prompt_files
from diffmem.errors import ConfigError, DataError
from tests.conftest import SMALL_DATA

POSITIVES = {"memorised": ["verbatim", "template"], "not_memorised": ["none"], "exclude": [], "min_dup_count": 16}
# (conf/positives/default.yaml counts verbatim only; these tests count templates too)


def _wen(path):
    """Wen et al.'s list: JSON lines of memorised prompts (caption, index, url), no class."""
    path.write_text(
        "".join(
            json.dumps({"caption": c, "index": i, "url": f"http://x/{i}.jpg"}) + "\n"
            for i, c in enumerate(["the zorblax emblem", "a vintage poster"])
        )
    )
    return path


def _nemo(tmp_path):
    """NeMo's pair: a `;`-CSV of memorised prompts with `type` VM/TM, and one of unmemorised ones."""
    mem, unmem = tmp_path / "memorized_prompts.csv", tmp_path / "unmemorized_prompts.csv"
    mem.write_text(
        ";Caption;URL;type;mean_sscd;max_sscd;Index\n"
        "0;the zorblax emblem;http://a;VM;0.8;0.9;11\n"
        '1;"a vintage\nposter";http://b;TM;0.5;0.6;12\n'
        "2;a red circle above a blue square;http://c;VM;0.7;0.95;13\n"
    )
    unmem.write_text(
        ";Caption;URL;Index\n0;two green triangles;http://d;21\n1;a grey background;http://e;22\n"
        "2;a small yellow star;http://f;23\n"
    )
    return mem, unmem


def _webster(path):
    """Webster et al.'s parquet: caption + overfit_type MV/TV/RV/N (+ extra columns)."""
    pd.DataFrame(
        {
            "caption": ["the zorblax emblem", "a vintage poster", "a red circle", "two green triangles"],
            "overfit_type": ["MV", "TV", "RV", "N"],
            "key": ["k1", "k2", "k3", "k4"],
            "gen_seeds": [[1, 2], [3], [4], [5]],
        }
    ).to_parquet(path)
    return path


def test_formats_and_schemas_map_to_one_ground_truth(tmp_path):
    wen = read_prompt_files([{"path": str(_wen(tmp_path / "wen.jsonl")), "label": "positive"}])
    assert wen["is_memorised"].tolist() == [True, True] and {"index", "url", "source"} <= set(wen.columns)
    assert ground_truth_labels(wen, POSITIVES).tolist() == [1, 1]

    mem, unmem = _nemo(tmp_path)
    nemo = read_prompt_files([{"path": str(mem), "label": "positive"}, {"path": str(unmem), "label": "negative"}])
    assert nemo["prompt_id"].tolist() == list(range(6)) and nemo["caption"][1] == "a vintage\nposter"
    assert nemo["memorisation_type"].tolist() == ["verbatim", "template", "verbatim", "none", "none", "none"]
    assert {"URL", "Index", "type", "max_sscd", "mean_sscd"} <= set(nemo.columns)  # every column kept
    assert ground_truth_labels(nemo, POSITIVES).tolist() == [1, 1, 1, 0, 0, 0]
    vm_vs_rest = ground_truth_labels(nemo, {**POSITIVES, "exclude": ["template"]})
    assert vm_vs_rest[[0, 2, 3]].tolist() == [1, 1, 0] and np.isnan(vm_vs_rest[1])
    # one file, its `type` column alone (no label): VM/TM memorised, N not
    assert read_prompt_file(mem)["type"].tolist() == ["VM", "TM", "VM"]

    web = read_prompt_files([{"path": str(_webster(tmp_path / "webster.parquet")), "label": None}])
    assert web["memorisation_type"].tolist() == ["verbatim", "template", "verbatim", "none"]
    assert web["is_memorised"].tolist() == [True, True, True, False] and web["gen_seeds"][0].tolist() == [1, 2]

    tsv = tmp_path / "p.tsv"
    tsv.write_text("prompt\tmemorisation_type\ttarget_file\na cat\tverbatim\tcat.png\na dog\tnone\t\n")
    t = read_prompt_files([{"path": str(tsv), "label": None}])
    assert t["caption"].tolist() == ["a cat", "a dog"] and t["target_file"][0] == "cat.png"


@pytest.mark.parametrize(
    "name,content,message",
    [
        # the blank caption's record starts on line 4: line 2's caption spans two lines
        ("nl.csv", 'caption;type\n"two\nlines";VM\n;TM\n', r"nl.csv: line 4: empty caption"),
        ("blank.jsonl", '{"caption": "a"}\n\n{"caption": ""}\n', r"blank.jsonl: line 3: empty caption"),
        ("bad.csv", "caption,type\na,XM\n", r"bad.csv: type 'XM' is not one of VM, TM, N \(row 1\)"),
    ],
)
def test_errors_name_the_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompt_files([{"path": str(tmp_path / name), "label": None}])


def test_parquet_blank_caption_names_the_row(tmp_path):
    pd.DataFrame({"caption": ["a", " "]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: row 2: empty caption"):
        read_prompt_file(tmp_path / "p.parquet")


@pytest.mark.parametrize(
    "files,message",
    [
        ("[{path: a.csv, label: memorised}]", "label 'memorised' of a.csv is not one of positive, negative"),
        ("[{file: a.csv}]", r"prompts.files\[0\]: expected \{path"),
        ("[{path: a.csv, lable: positive}]", "unknown field.*lable"),
    ],
)
def test_bad_files_are_refused(tmp_path, files, message):
    (tmp_path / "a.csv").write_text("caption\nx\n")
    cfg = diffmem.compose("detect", ["prompts=file", f"prompts.files={files}"])
    with pytest.raises(ConfigError, match=message):
        _load(cfg, tmp_path)


def test_an_explicit_label_wins_over_the_files_column_and_says_so(tmp_path, caplog):
    """NeMo's ``type`` says VM, the user says ``label: negative``: the label counts, and a log
    line says which rows it overrode (once silently scored as memorised)."""
    (tmp_path / "n.csv").write_text("Caption;type\na cat;VM\na cow;N\na dog;TM\n")
    df = read_prompt_files([{"path": str(tmp_path / "n.csv"), "label": "negative"}])
    assert ground_truth_labels(df, POSITIVES).tolist() == [0.0, 0.0, 0.0]
    assert "label=negative overrides the file's memorisation type of 2 of 3 rows" in caplog.text
    (tmp_path / "p.csv").write_text("Caption;type\na cat;VM\na cow;N\n")
    df = read_prompt_files([{"path": str(tmp_path / "p.csv"), "label": "positive"}])
    assert ground_truth_labels(df, POSITIVES).tolist() == [1.0, 1.0]
    assert df["memorisation_type"].tolist()[0] == "verbatim"  # a type that agrees is kept


def test_duplicate_prompts_are_counted_once(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("a cat\na dog\na cat\n")
    (tmp_path / "b.txt").write_text("a dog \na cow\n")
    df = read_prompt_files(
        [{"path": str(tmp_path / "a.txt"), "label": "positive"}, {"path": str(tmp_path / "b.txt"), "label": "positive"}]
    )
    assert df["caption"].tolist() == ["a cat", "a dog", "a cow"] and df["prompt_id"].tolist() == [0, 1, 2]
    assert "2 of 5 prompts are listed more than once" in caplog.text


def _load(cfg, tmp_path):
    import os

    from diffmem.data.prompts import stage_prompts

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        return stage_prompts(cfg)
    finally:
        os.chdir(here)


def _tiny(pipe_dir):
    return [
        "model=local",
        f"model.path={pipe_dir}",
        "detect=noise_norm",
        "detect.num_inference_steps=4",
        "detect.steps=[0]",
        "detect.n_generations=1",
    ]


def test_detect_from_two_files_with_exclusions_and_hard_negatives(tiny_pipe_dir, tmp_path, caplog):
    mem, unmem = _nemo(tmp_path)
    files = f"prompts.files=[{{path: '{mem}', label: positive}}, {{path: '{unmem}', label: negative}}]"
    run_dir = diffmem.run(
        "detect",
        [
            *_tiny(tiny_pipe_dir),
            "prompts=file",
            files,
            "positives.memorised=[verbatim,template]",
            "positives.exclude=[template]",
        ],
    )
    res = diffmem.load_run(run_dir)
    scores = res.table("scores")
    assert scores["label"].isna().sum() == 1 and scores["label"].sum() == 2  # TM left out
    assert set(scores["source"]) == {str(mem), str(unmem)}
    gt = res.metrics["ground_truth"]
    assert gt["n_pos"] == 2 and gt["n_neg"] == 3 and gt["n_excluded"] == 1 and "roc_auc" in res.metrics

    # only positives: no ROC, and the console says why
    wen = _wen(tmp_path / "wen.jsonl")
    with caplog.at_level(logging.INFO, logger="diffmem.detect"):
        run_dir = diffmem.run(
            "detect",
            [*_tiny(tiny_pipe_dir), "prompts=file", f"prompts.path={wen}", "prompts.label=positive", "name=wen"],
        )
    assert "roc_auc" not in diffmem.load_run(run_dir).metrics
    assert "no ROC metrics: 2 positives and 0 negatives" in caplog.text

    # the testbed's rare canaries are hard negatives: their own AUC, in metrics.json and on the console
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffmem.detect"):
        run_dir = diffmem.run(
            "detect",
            [
                *_tiny(tiny_pipe_dir),
                *SMALL_DATA,
                "prompts.n_ordinary=2",
                "prompts.n_heldout=2",
                "positives.min_dup_count=4",
                "name=tb",
            ],
        )
    hard = diffmem.load_run(run_dir).metrics["ground_truth"]["hard_negatives"]
    assert hard["n_neg"] == 1 and hard["n_pos"] == 1  # the 1x canary vs the 4x canary
    assert "memorised vs hard negatives (1 prompts trained on but not memorised)" in caplog.text
    assert "ROC-AUC vs hard negatives" in (run_dir / "report.html").read_text()


def _target_list(tmp_path, small_testbed):
    """A prompt list naming its training images by `target_file` (relative to data.root)."""
    _, manifest = small_testbed
    first = manifest.drop_duplicates("caption")
    canary = first[(first.kind == "canary") & (first.dup_count == 4)].iloc[0]
    ordinary = first[first.kind == "ordinary"].head(3)
    path = tmp_path / "targets.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(["Caption", "type", "target_file"])
        w.writerow([canary.caption, "VM", canary.file])
        for row in ordinary.itertuples():
            w.writerow([row.caption, "N", row.file])
    return path


@pytest.mark.slow  # ~25 s: keeps the default file under a minute
def test_probe_and_evaluate_mitigation_from_a_prompt_list(tiny_pipe_dir, tmp_path):
    data = [a.replace("${paths.data_dir}/testbed-small", str(tmp_path / "tb")) for a in SMALL_DATA]
    from diffmem.data import load_dataset

    small = load_dataset(diffmem.compose("probe", data).data)
    plist = _target_list(tmp_path, small)
    common = ["features.extractor.size=8", *data, "prompts=file", f"prompts.path={plist}", "steps=3", "n_per_prompt=2"]
    model = ["model=local", f"model.path={tiny_pipe_dir}"]
    run_dir = diffmem.run(
        "probe", [*model, *common, "probe=trigger_search", "probe.steps=2", "probe.restarts=1", "n_controls=1"]
    )
    m = diffmem.load_run(run_dir).metrics
    assert m["n_targets"] == 1 and m["n_negatives"] == 3 and m["n_controls"] == 1
    run_dir = diffmem.run(
        "evaluate-mitigation",
        [*common, f"models.original={tiny_pipe_dir}", "trigger.steps=2", "trigger.restarts=1", "utility.n_prompts=4"],
    )
    table = diffmem.load_run(run_dir).table("mitigations")
    assert table["model"].tolist() == ["original"] and np.isfinite(table["mr"]).all()

    # no target_file / target_id column: one line naming what is missing, before any work
    bare = tmp_path / "bare.csv"
    bare.write_text("Caption;type\nthe zorblax emblem;VM\nx;N\ny;N\n")
    with pytest.raises(DataError, match="no `target_file` column .* nor a `target_id` column"):
        diffmem.run("mitigate", ["mitigation=adversarial_ft", *model, *common[:-3], f"prompts.path={bare}"])


def test_target_id_resolves_through_the_dataset(tmp_path, small_testbed):
    root, manifest = small_testbed
    from diffmem.data.prompt_lists import resolve_targets

    row = manifest.iloc[0]
    got = resolve_targets(pd.DataFrame({"caption": ["c"], "target_id": [row.image_id]}), manifest)
    assert got["target_file"].tolist() == [row.file]
    with pytest.raises(DataError, match="target_id 'nope' .* is not an image_id"):
        resolve_targets(pd.DataFrame({"caption": ["c"], "target_id": ["nope"]}), manifest)


@pytest.fixture
def photo_folder(tmp_path):
    """Ten real photos (skimage.data, 48 px JPEGs) and a captions.csv, one caption shared by two."""
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "horse", "retina", "cat", "text"]
    root = tmp_path / "photos"
    root.mkdir()
    rows = []
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((48, 48))
        img.save(root / f"{name}.jpg", quality=90)
        rows.append((f"{name}.jpg", "a photo of a cat" if name in ("chelsea", "cat") else f"a photo of {name}"))
    with open(root / "captions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "caption"), *rows])
    return root


def test_audit_on_a_folder_of_photos_with_nothing_else(tiny_pipe_dir, photo_folder):
    args = [
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "data=folder",
        f"data.root={photo_folder}",
        "data.manifest=captions.csv",
    ]
    run_dir = diffmem.run("audit", args)
    res = diffmem.load_run(run_dir)
    prompts = res.table("prompts")
    assert res.done and len(prompts) == 9  # distinct captions
    assert set(prompts["target_file"]) <= {p.name for p in photo_folder.glob("*.jpg")}
    assert "baseline_n" not in res.metrics["dcr"]  # no split column: no held-out baseline
    assert not (run_dir / "baseline.parquet").exists()
    # the captions are the prompts, capped and seeded
    capped = diffmem.compose("audit", [*args, "prompts.max_prompts=3"])
    from diffmem.data.prompts import stage_prompts

    assert stage_prompts(capped)["caption"].tolist() == stage_prompts(capped)["caption"].tolist()
    assert len(stage_prompts(capped)) == 3


@pytest.mark.parametrize(
    "extra,error,message",
    [
        (["baseline_split=heldout"], ConfigError, "no 'split' column; use baseline_split=null"),
        (["prompts=testbed"], ConfigError, "prompts=testbed needs the testbed dataset .* use prompts=dataset"),
        (["prompts=file"], ConfigError, "prompts=file needs prompts.path"),
        (["prompts.max_prompts=0"], ConfigError, "prompts.max_prompts must be >= 1"),
    ],
)
def test_folder_audit_inconsistencies_are_refused_before_generation(
    tiny_pipe_dir, photo_folder, tmp_path, extra, error, message
):
    out = tmp_path / "refused"
    args = [
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "data=folder",
        f"data.root={photo_folder}",
        "data.manifest=captions.csv",
        f"run_dir={out}",
        *extra,
    ]
    with pytest.raises(error, match=message):
        diffmem.run("audit", args)
    assert not out.exists()


@pytest.mark.parametrize("stage", ["generate", "detect", "probe", "mitigate"])
def test_no_stage_assumes_testbed_columns(tiny_pipe_dir, photo_folder, stage):
    """On folder data the stages take the data's captions; without ground truth the stages
    that need memorised prompts say so in one line (no KeyError)."""
    args = [
        "model=local",
        f"model.path={tiny_pipe_dir}",
        "data=folder",
        f"data.root={photo_folder}",
        "data.manifest=captions.csv",
    ]
    if stage in ("probe", "mitigate"):
        with pytest.raises(DataError, match=f"{stage}: the prompts carry no ground truth"):
            diffmem.run(stage, args)
    else:
        from diffmem.data.prompts import stage_prompts

        prompts = stage_prompts(diffmem.compose(stage, args))
        assert len(prompts) == 9 and "target_file" in prompts
