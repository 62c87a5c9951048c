"""A self-contained HTML audit report: one file with every image embedded, readable offline or mailed.

The figures are also kept as PNG files in ``run_dir/figures/`` for reuse in papers and slides.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffmem.report.figures import (
    ROC_FIGURE,
    GridPair,
    detection_by_dup_count,
    dup_count_table,
    image_grid,
    similarity_histogram,
)
from diffmem.runs import atomic_path

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.4}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.meta{color:#666;font-size:.9rem}
.cards{display:flex;flex-wrap:wrap;gap:.8rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem .9rem;min-width:150px}
.card .v{font-size:1.5rem;font-weight:600}.card .n{color:#666;font-size:.8rem}
table{border-collapse:collapse;font-size:.85rem}
th,td{border-bottom:1px solid #eee;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f5f5;position:sticky;top:0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.flag td{background:#fdecea}
.scroll{max-height:32rem;overflow:auto;border:1px solid #eee}
.prompt{margin:1.2rem 0}.prompt h3{margin:.2rem 0;font-size:1rem}
.caption{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
img{max-width:100%}.prompt img{image-rendering:pixelated}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.8rem}
"""

_PROMPT_COLUMNS = (
    "prompt_id",
    "caption",
    "score_band",
    "memorised",
    "max_score",
    "mean_score",
    "replicated_share",
    "n_generations",
    "kind",
    "dup_count",
    "memorisation_type",
    "target_file",
    "correct_match_share_of_replicated",
)
_DUP_COLUMNS = ("category", "prompts", "flagged_share", "mean_max_score", "correct_match_share_of_replicated")
_DEFINITIONS = (
    "<p><b>score_band</b>: the prompt's max score <i>above</i> the replication threshold, "
    "<i>between</i> the DCR and the replication thresholds, or <i>below</i> both (bands of "
    "the score, not NeMo's verbatim / template classes). <b>correct_match_share_of_replicated"
    "</b>: of the generations above the threshold, the share whose nearest training image is "
    "the prompt's own (as in metrics.json).</p>"
)


def _missing(value: object) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    return "–" if _missing(value) else fmt.format(value)


def _pct(value: Any) -> str:
    return _num(None if _missing(value) else 100 * float(value), "{:.1f}%")


def _cell(value: object) -> str:
    """A table cell's text: 3 decimals for floats, yes/no for booleans, a dash for missing."""
    if _missing(value):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value)


def _table(df: pd.DataFrame, flag: pd.Series | None = None) -> str:
    """``df`` as an escaped HTML table; rows where ``flag`` is true are highlighted."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for i, (_, row) in enumerate(df.iterrows()):
        cls = ' class="flag"' if flag is not None and bool(flag.iloc[i]) else ""
        cells = "".join(
            f'<td class="num">{html.escape(_cell(v))}</td>'
            if isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
            else f"<td>{html.escape(_cell(v))}</td>"
            for v in row
        )
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _header(title: str, metrics: dict) -> str:
    prov = metrics.get("provenance") or {}
    meta = [
        f"feature <b>{html.escape(str(metrics.get('feature', '?')))}</b>",
        f"threshold <b>{float(metrics['threshold']):g}</b>",
    ]
    meta += [f"{k} {html.escape(str(prov[k]))}" for k in ("date", "git") if prov.get(k)]
    versions = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v)
    warning = (
        f'<p class="warning"><b>Warning: {html.escape(metrics["warning"])}</b></p>' if metrics.get("warning") else ""
    )
    return (
        f'<header><h1>{html.escape(title)}</h1><p class="meta">{" · ".join(meta)}</p>'
        + (f'<p class="meta">{html.escape(versions)}</p>' if versions else "")
        + warning
        + "</header>"
    )


def _summary(
    generations: pd.DataFrame, prompts: pd.DataFrame, metrics: dict[str, Any], base_scores: pd.Series | None
) -> str:
    """Headline numbers: memorisation rate, flagged prompts, replicated share, DCR vs baseline."""
    dcr = metrics.get("dcr") or {}
    gen = generations["top1_score"].to_numpy(float)
    base_mean = dcr.get("baseline_mean", float(np.mean(base_scores)) if base_scores is not None else None)
    base_p95 = dcr.get("baseline_p95", float(np.percentile(base_scores, 95)) if base_scores is not None else None)
    n_known = metrics.get("memorisation_rate_prompts")
    cards = [
        (
            "memorisation rate",
            _pct(metrics.get("memorisation_rate")),
            f"of {n_known} known memorised prompts with a generation above the threshold"
            if n_known
            else "no known memorised prompts (no ground truth)",
        ),
        ("prompts flagged", f"{int(prompts['memorised'].sum())} / {len(prompts)}", "memorised"),
        (
            "generations replicated",
            _pct(generations["replicated"].astype(float).mean()),
            f"top-1 score > {float(metrics['threshold']):g}",
        ),
        ("DCR mean", _num(dcr.get("mean", gen.mean())), _vs_baseline(base_mean)),
        ("DCR 95th percentile", _num(dcr.get("p95", np.percentile(gen, 95))), _vs_baseline(base_p95)),
    ]
    body = _cards(cards)
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div></section>'


def _vs_baseline(value: object) -> str:
    return "no baseline" if _missing(value) else f"held-out real baseline {_num(value)}"


def _cards(cards: Iterable[tuple[str, str, str]]) -> str:
    """Headline numbers: ``(name, value, note)`` triples as cards."""
    return "".join(
        f'<div class="card"><div>{html.escape(a)}</div><div class="v">{html.escape(b)}</div>'
        f'<div class="n">{html.escape(c)}</div></div>'
        for a, b, c in cards
    )


def _section(anchor: str, heading: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{"".join(parts)}</section>'


def _examples(generations: pd.DataFrame, prompts: pd.DataFrame, fig_dir: Path, top_n: int, per_prompt: int) -> str:
    """For the ``top_n`` prompts by max score: their best generations beside the nearest training images."""
    has_match = "correct_match" in generations
    blocks = []
    for rank, (_, p) in enumerate(prompts.nlargest(top_n, "max_score").iterrows(), start=1):
        gens = generations[generations["prompt_id"] == p["prompt_id"]].nlargest(per_prompt, "top1_score")
        pairs = [
            GridPair(
                g["file_abs"],
                g["top1_ref_file_abs"],
                f"score {g['top1_score']:.3f}\nref {_ref_name(g)}"
                + (_match_note(g["correct_match"]) if has_match else ""),
                bool(g["replicated"]),
            )
            for _, g in gens.iterrows()
        ]
        grid = image_grid(pairs, fig_dir / f"grid_{rank:02d}.png")
        facts = [f"prompt {p['prompt_id']}", f"score band {p.get('score_band', '–')}", f"max {_num(p['max_score'])}"]
        facts += [f"{c} {_cell(p[c])}" for c in ("kind", "dup_count") if c in p]
        blocks.append(
            f'<div class="prompt"><h3>#{rank} · {html.escape(" · ".join(facts))}</h3>'
            f'<p class="caption">{html.escape(str(p["caption"]))}</p>'
            f"{_img(grid, 'generations for prompt ' + str(p['prompt_id']))}</div>"
        )
    note = (
        "<p>Each pair: generated image (left) and its nearest training image (right); a red frame "
        "marks a score above the threshold.</p>"
    )
    return _section("examples", f"Top {len(blocks)} prompts: generations and nearest training images", note, *blocks)


def _ref_name(gen: pd.Series) -> str:
    """The nearest training image by its file name (what a user recognises), else its id."""
    f = gen.get("top1_ref_file")
    return str(gen["top1_ref_id"]) if _missing(f) else Path(str(f)).name


def _match_note(correct: object) -> str:
    return "" if _missing(correct) else (" (own)" if correct else " (other)")


def write_report(
    run_dir: str | Path,
    generations: pd.DataFrame,
    prompts: pd.DataFrame,
    metrics: dict,
    baseline: pd.DataFrame | None = None,
    title: str = "diffmem audit",
    *,
    top_n: int = 12,
    per_prompt: int = 4,
) -> Path:
    """Write ``run_dir/report.html`` (self-contained) and its figures under ``run_dir/figures/``.

    ``generations``, ``prompts``, ``metrics`` and ``baseline`` are the audit's outputs (see the
    package docs for their columns); ground-truth columns (``kind``, ``dup_count``,
    ``correct_match``) and ``baseline`` are optional. Returns the path of ``report.html``.
    """
    run_dir = Path(run_dir)
    prompts = prompts.astype({c: "Int64" for c in ("dup_count", "n_generations") if c in prompts})
    fig_dir = run_dir / "figures"
    threshold = float(metrics["threshold"])
    base_scores = None if baseline is None else baseline["top1_score"].to_numpy(float)
    feature = str(metrics.get("feature", "?"))

    hist = similarity_histogram(
        generations["top1_score"],
        base_scores,
        threshold,
        fig_dir / "similarity_histogram.png",
        xlabel=f"top-1 cosine similarity to the training set ({feature})",
    )
    parts = [
        _header(title, metrics),
        _summary(generations, prompts, metrics, base_scores),
        _section(
            "similarity",
            "Similarity to the training set",
            "<p>Each generation's similarity to its nearest training image"
            + (", against held-out real images' (the Somepalli baseline)" if base_scores is not None else "")
            + ".</p>",
            _img(hist, "similarity histogram"),
        ),
    ]
    if "dup_count" in prompts and prompts["dup_count"].notna().any():
        dup_fig = detection_by_dup_count(prompts, fig_dir / "detection_by_dup_count.png", threshold)
        table = dup_count_table(prompts)
        parts.append(
            _section(
                "duplication",
                "Detection vs known duplication count",
                "<p>Share of prompts flagged memorised and their mean max score, per number of "
                "training copies (ordinary and held-out prompts as their own categories).</p>",
                _img(dup_fig, "detection by duplication count"),
                _table(table[[c for c in _DUP_COLUMNS if c in table]]),
            )
        )
    ranked = prompts.sort_values(["memorised", "max_score"], ascending=False, kind="stable")
    parts.append(
        _section(
            "prompts",
            "Prompts ranked by max score (memorised first)",
            _DEFINITIONS,
            _table(ranked[[c for c in _PROMPT_COLUMNS if c in ranked]], flag=ranked["memorised"]),
        )
    )
    parts.append(_examples(generations, prompts, fig_dir, top_n, per_prompt))
    return _write_page(run_dir / "report.html", title, parts, metrics)


def _write_page(out: Path, title: str, parts: list[str], metrics: dict) -> Path:
    """One self-contained page from ``parts`` plus the resolved config, written atomically."""
    config = (metrics.get("provenance") or {}).get("config")
    if config is not None:
        parts = parts + [
            '<details id="config"><summary>Resolved configuration</summary><pre>'
            + html.escape(json.dumps(config, indent=2, default=str))
            + "</pre></details>"
        ]
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def _tokens(rows: pd.DataFrame) -> str:
    """A prompt's tokens shaded by |attribution| (relative to its largest token)."""
    peak = float(rows["attribution"].abs().max()) or 1.0
    spans = [
        f'<span title="{r.attribution:.4g}" style="background:rgba(214,39,40,'
        f'{abs(float(r.attribution)) / peak:.2f});padding:0 .15rem">{html.escape(str(r.token))}</span>'
        for r in rows.sort_values("token_index").itertuples()
    ]
    return f'<span class="caption">{" ".join(spans)}</span>'


def write_detect_report(
    run_dir: str | Path,
    scores: pd.DataFrame,
    metrics: dict,
    attribution: pd.DataFrame | None = None,
    title: str = "diffmem detect",
) -> Path:
    """``run_dir/report.html`` for a detect run: headline metrics, the ROC curve, prompts ranked
    by score and, with ``attribution``, each prompt's tokens shaded by their attribution."""
    run_dir = Path(run_dir)
    cards = [
        ("detector", str(metrics.get("detector", "?")), f"{metrics.get('n_prompts', len(scores))} prompts"),
        ("ROC-AUC", _num(metrics.get("roc_auc")), "vs ground truth" if "roc_auc" in metrics else "no labels"),
        ("TPR at FPR", _num(metrics.get("tpr_at_fpr")), f"FPR {metrics.get('fpr', '–')}"),
        ("UNet evaluations", _num(metrics.get("unet_calls_per_prompt"), "{:.0f}"), "per prompt"),
    ]
    hard = (metrics.get("ground_truth") or {}).get("hard_negatives")
    if hard:
        cards.insert(
            2,
            (
                "ROC-AUC vs hard negatives",
                _num(hard["roc_auc"]),
                f"{hard['n_neg']} prompts trained on but not memorised",
            ),
        )
    body = _cards(cards)
    parts = [
        f"<header><h1>{html.escape(title)}</h1></header>",
        f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div></section>',
    ]
    if (run_dir / ROC_FIGURE).exists():
        parts.append(_section("roc", "ROC curve", _img(run_dir / ROC_FIGURE, "ROC curve")))
    ranked = scores.sort_values("score", ascending=False, kind="stable")
    cols = [
        c
        for c in (
            "prompt_id",
            "caption",
            "score",
            "label",
            "hard_negative",
            "kind",
            "dup_count",
            "type",
            "memorisation_type",
            "source",
        )
        if c in ranked
    ]
    flag = ranked["label"].eq(1) if "label" in ranked else None
    parts.append(
        _section(
            "scores",
            "Prompts ranked by score (higher = more likely memorised)",
            '<div class="scroll">' + _table(ranked[cols], flag=flag) + "</div>",
        )
    )
    if attribution is not None and not attribution.empty:
        by_prompt = dict(tuple(attribution.groupby("prompt_id")))
        rows = "".join(
            f'<div class="prompt">{_num(r.score)} &nbsp; {_tokens(by_prompt[r.prompt_id])}</div>'
            for r in ranked.itertuples()
            if r.prompt_id in by_prompt
        )
        parts.append(
            _section(
                "attribution",
                "Per-token attribution of the score",
                "<p>Gradient of the score with respect to each token's embedding (its norm); "
                "darker tokens drive the score more. Hover for the value.</p>",
                rows,
            )
        )
    return _write_page(run_dir / "report.html", title, parts, metrics)


def write_dedup_report(
    run_dir: str | Path,
    groups: pd.DataFrame,
    summary: dict,
    top_n: int = 12,
    per_group: int = 8,
    title: str = "diffmem dedup",
) -> Path:
    """``run_dir/report.html`` for a dedup run: headline counts, the groups ranked by size and,
    for the ``top_n`` largest, up to ``per_group`` members (lowest score first) beside their
    representative. ``groups``: groups.parquet's rows with ``file_abs`` and ``rep_abs``."""
    run_dir = Path(run_dir)
    cards = [
        ("rows", str(summary["rows"]), f"{summary['images']} image files"),
        ("groups", str(summary["groups"]), f"{summary['rows_removed']} rows removed"),
        ("rows in groups of 2+", str(summary["rows_in_groups"]), f"largest group {summary['largest_group']}"),
    ]
    parts = [
        _header(title, summary),
        f'<section id="summary"><h2>Summary</h2><div class="cards">{_cards(cards)}</div></section>',
    ]
    multi = groups[groups["group_size"] > 1]
    table = multi.groupby("group_id", sort=True).agg(
        size=("group_size", "first"),
        files=("file", "nunique"),
        min_score=("score", "min"),
        representative=("rep_file", "first"),
    )
    parts.append(
        _section(
            "groups",
            "Groups of two or more rows, largest first",
            _table(table.reset_index()) if len(table) else "<p>No near-duplicates.</p>",
        )
    )
    shown = []
    for gid, rows in list(multi.groupby("group_id", sort=True))[:top_n]:
        members = rows[~rows["is_representative"]].drop_duplicates("file").sort_values("score").head(per_group)
        pairs = [
            GridPair(
                r.file_abs,
                r.rep_abs,
                f"{Path(r.file).name}\ncos {r.score:.3f}" + (" (exact)" if getattr(r, "exact", False) else ""),
            )
            for r in members.itertuples()
        ]
        if not pairs:  # rows listing the representative's own file only
            pairs = [GridPair(rows["rep_abs"].iloc[0], rows["rep_abs"].iloc[0], "the same file, listed again")]
        grid = image_grid(pairs, run_dir / "figures" / f"group-{gid:06d}.png", size=96, cols=4)
        shown.append(
            f'<div class="prompt"><h3>group {gid}: {int(rows["group_size"].iloc[0])} rows; '
            f"representative {html.escape(str(rows['rep_file'].iloc[0]))}</h3>"
            f"{_img(grid, f'group {gid}')}</div>"
        )
    if shown:
        parts.append(_section("largest", f"The {len(shown)} largest groups (member | representative)", *shown))
    return _write_page(run_dir / "report.html", title, parts, summary)
