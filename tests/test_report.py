"""The HTML report: self-contained, escaped, with its figures as valid PNGs, with and without ground truth."""

from __future__ import annotations

import html
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmem.report import dup_count_table, image_grid, write_report

TOP_CAPTION = 'a <red> & "blue" square'
C1, C2 = (255, 0, 0), (0, 0, 255)
# prompt_id, caption, kind, dup_count, max_score, memorised, score band
PROMPTS = [
    ("p0", TOP_CAPTION, "canary", 4, 0.95, True, "above"),
    ("p1", "a striped template", "template", 3, 0.80, True, "above"),
    ("p2", "an ordinary circle", "ordinary", 1, 0.30, False, "below"),
    ("p3", "a held-out triangle", "heldout", 0, 0.20, False, "below"),
]


def _png(path, colors=(C1, C2)):
    """An 8x8 checkerboard of two colours (so NEAREST upscaling is detectable)."""
    checker = (np.indices((8, 8)).sum(0) % 2).astype(bool)
    arr = np.where(checker[..., None], colors[0], colors[1]).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture
def audit(tmp_path):
    """(generations, prompts, metrics, baseline) for 4 prompts x 2 generations of 8x8 images."""
    rows, prows = [], []
    for i, (pid, cap, kind, dup, top, mem, label) in enumerate(PROMPTS):
        ref = _png(tmp_path / f"ref{i}.png", ((0, 255, 0), (i * 40, 0, 0)))
        scores = [top, top - 0.1]
        for j, s in enumerate(scores):
            rows.append(
                dict(
                    sample_id=f"{pid}_{j}",
                    prompt_id=pid,
                    caption=cap,
                    file_abs=_png(tmp_path / f"gen{i}{j}.png", ((i * 50, 90, j * 90), (9, 9, 9))),
                    top1_score=s,
                    top1_ref_id=f"r{i}",
                    top1_ref_file_abs=ref,
                    replicated=s > 0.5,
                    kind=kind,
                    group="",
                    dup_count=dup,
                    correct_match=(j == 0) if kind != "heldout" else np.nan,
                )
            )
        prows.append(
            dict(
                prompt_id=pid,
                caption=cap,
                n_generations=2,
                max_score=top,
                mean_score=np.mean(scores),
                replicated_share=np.mean([s > 0.5 for s in scores]),
                memorised=mem,
                score_band=label,
                kind=kind,
                dup_count=dup,
                n_replicated=2,
                correct_match_share_of_replicated=0.5,
            )
        )
    metrics = {
        "threshold": 0.5,
        "feature": "pixel",
        "memorisation_rate": 0.5,
        "memorisation_rate_prompts": 2,
        "dcr": {"mean": 0.5, "p95": 0.9, "baseline_mean": 0.2, "baseline_p95": 0.3},
        "provenance": {
            "config": {"seed": 1234, "note": "<cfg>"},
            "git": "abc123",
            "date": "2025-01-01T00:00:00+00:00",
            "versions": {"numpy": "2.4.6"},
        },
    }
    baseline = pd.DataFrame({"top1_score": [0.1, 0.2, 0.25, 0.3]})
    return pd.DataFrame(rows), pd.DataFrame(prows), metrics, baseline


def _assert_self_contained(text: str):
    assert 'src="http' not in text and 'src="/' not in text
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)


def _assert_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()


def test_report_with_ground_truth(tmp_path, audit):
    gens, prompts, metrics, baseline = audit
    out = write_report(tmp_path / "run", gens, prompts, metrics, baseline=baseline, title="T & <audit>")
    assert out == tmp_path / "run" / "report.html" and out.is_file()
    text = out.read_text(encoding="utf-8")
    _assert_self_contained(text)
    assert html.escape(TOP_CAPTION) in text and TOP_CAPTION not in text
    assert "T &amp; &lt;audit&gt;" in text
    # memorised prompts first, by max score: the top caption precedes the ordinary one
    assert text.index(html.escape(TOP_CAPTION)) < text.index("an ordinary circle")
    assert "50.0%" in text and "abc123" in text and "held-out real baseline 0.300" in text
    assert "Detection vs known duplication count" in text and "canary ×4" in text
    assert "of 2 known memorised prompts" in text  # the memorisation rate's denominator
    assert text.count("correct_match_share_of_replicated") >= 3  # two tables' column + its definition
    assert "score_band" in text and ">VM<" not in text
    assert re.search(r"<details[^>]*>.*&quot;note&quot;: &quot;&lt;cfg&gt;&quot;", text, re.S)
    figs = tmp_path / "run" / "figures"
    expected = ["similarity_histogram.png", "detection_by_dup_count.png"] + [
        f"grid_{k:02d}.png" for k in range(1, len(PROMPTS) + 1)
    ]
    for name in expected:
        _assert_png(figs / name)
    assert not list(figs.glob(".*.tmp"))  # atomic writes left no temporary files


def test_report_without_ground_truth_or_baseline(tmp_path, audit):
    gens, prompts, metrics, _ = audit
    gens = gens.drop(columns=["kind", "group", "dup_count", "correct_match"])
    prompts = prompts.drop(columns=["kind", "dup_count", "n_replicated", "correct_match_share_of_replicated"])
    metrics = {k: v for k, v in metrics.items() if k != "provenance"}
    metrics["dcr"] = {"mean": 0.5, "p95": 0.9}
    out = write_report(tmp_path, gens, prompts, metrics, top_n=1)
    text = out.read_text(encoding="utf-8")
    _assert_self_contained(text)
    assert html.escape(TOP_CAPTION) in text and "no baseline" in text
    assert "Detection vs known duplication count" not in text and "<details" not in text
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["grid_01.png", "similarity_histogram.png"]


def test_dup_count_table_orders_categories():
    prompts = pd.DataFrame(
        [
            dict(prompt_id=p, caption=c, kind=k, dup_count=d, max_score=s, memorised=m)
            for p, c, k, d, s, m, _ in PROMPTS + [("p4", "x", "canary", 4, 0.4, False, "N")]
        ]
    )
    table = dup_count_table(prompts)
    assert list(table["category"]) == ["heldout", "ordinary", "canary ×4", "template ×3"]
    assert table.set_index("category").loc["canary ×4", ["prompts", "flagged_share"]].tolist() == [2, 0.5]


def test_image_grid_upscales_with_nearest(tmp_path):
    a = _png(tmp_path / "a.png")
    b = _png(tmp_path / "b.png", ((0, 200, 0), (200, 200, 0)))
    grid = image_grid([(a, b, "score 0.9", True), (a, None, "missing ref")], tmp_path / "g.png", size=96)
    with Image.open(grid) as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    # two 96x96 copies of the 8x8 checkerboard, half of each exactly C1: only NEAREST keeps that count
    assert int((pixels == C1).all(1).sum()) == 2 * 96 * 96 // 2


def test_report_says_when_the_descriptor_is_meaningless(tmp_path, audit):
    """An audit with a randomly initialised CLIP carries the warning in its metrics; the
    report shows it in words at the top."""
    gens, prompts, metrics, baseline = audit
    warning = "randomly initialised CLIP — not a meaningful descriptor"
    text = write_report(tmp_path / "run", gens, prompts, {**metrics, "warning": warning}).read_text()
    assert f"Warning: {warning}" in text.split("</header>")[0]
    plain = write_report(tmp_path / "plain", gens, prompts, metrics).read_text()
    assert "Warning:" not in plain
