"""The report's figures, each written atomically as a standalone PNG (reusable outside the report).

Plots use matplotlib's object-oriented ``Figure`` (rendered by Agg when saved as PNG), not
pyplot, so making a report never switches the backend of the caller's session (e.g. a notebook).
Image grids are drawn with PIL so small images are upscaled pixel-exactly (NEAREST).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from diffmem.runs import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROC_FIGURE = "roc.png"  # a detect run's ROC curve

_OWN_CATEGORIES = ("heldout", "ordinary")  # prompt kinds shown as one category each
_GEN_COLOR, _BASE_COLOR, _FLAG_COLOR = "#1f77b4", "#7f7f7f", "#d62728"


class GridPair(NamedTuple):
    """One generated image beside its nearest training image; ``highlight`` frames it in red."""

    generated: str | os.PathLike | None
    reference: str | os.PathLike | None
    label: str
    highlight: bool = False


def save_figure(fig: Figure, path: str | Path) -> Path:
    """A matplotlib ``Figure`` as a PNG at ``path``, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def similarity_histogram(
    scores: npt.ArrayLike,
    baseline_scores: npt.ArrayLike | None,
    threshold: float,
    path: str | Path,
    xlabel: str = "top-1 similarity to the training set",
) -> Path:
    """Density histograms of generations' top-1 scores and (if given) held-out real images' scores.

    Both share the same bins, so the generated mass beyond the baseline (Somepalli's test) is
    visible; a dashed line marks the replication threshold.
    """
    from matplotlib.figure import Figure

    scores = np.asarray(scores, dtype=float)
    base = None if baseline_scores is None else np.asarray(baseline_scores, dtype=float)
    values = np.concatenate([scores, base if base is not None else [], [threshold]])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    bins = cast("Sequence[float]", np.linspace(lo - 0.01, hi + 0.01, 41))  # matplotlib types no array bins

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    ax.hist(
        scores,
        bins=bins,
        density=True,
        histtype="stepfilled",
        alpha=0.55,
        color=_GEN_COLOR,
        label=f"generated (n={scores.size})",
    )
    if base is not None:
        ax.hist(
            base,
            bins=bins,
            density=True,
            histtype="step",
            linewidth=1.8,
            color=_BASE_COLOR,
            label=f"held-out real, baseline (n={base.size})",
        )
    ax.axvline(threshold, color=_FLAG_COLOR, linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path)


def _category(kind: Any, dup: Any) -> str:
    if kind in _OWN_CATEGORIES:
        return kind
    dup_text = "?" if pd.isna(dup) else f"×{int(dup)}"
    return dup_text if kind is None or pd.isna(kind) else f"{kind} {dup_text}"


def dup_count_table(prompts: pd.DataFrame) -> pd.DataFrame:
    """Detection per known duplication count: prompts, share flagged memorised, mean max score.

    Ordinary and held-out prompts are one category each; other kinds (canary, template) are
    split by ``dup_count``. Rows run held-out, ordinary, then by kind and duplication count.
    """
    kinds = prompts["kind"] if "kind" in prompts else pd.Series(None, index=prompts.index, dtype=object)
    dups = pd.to_numeric(prompts["dup_count"], errors="coerce")
    df = prompts.assign(
        category=[_category(k, d) for k, d in zip(kinds, dups)],
        kind=kinds,
        dup_count=dups,
        _order=[_OWN_CATEGORIES.index(k) if k in _OWN_CATEGORIES else len(_OWN_CATEGORIES) for k in kinds],
    )
    aggs = {
        "prompts": ("prompt_id", "size"),
        "flagged_share": ("memorised", "mean"),
        "mean_max_score": ("max_score", "mean"),
    }
    share = "correct_match_share_of_replicated"
    if share in df and "n_replicated" in df:  # pooled over the replicated generations, as in metrics.json
        weight = df["n_replicated"].where(df[share].notna(), 0)
        df = df.assign(_correct=df[share].fillna(0) * weight, _replicated=weight)
        aggs.update(_correct=("_correct", "sum"), _replicated=("_replicated", "sum"))
    out = (
        df.astype({"memorised": float})
        .groupby("category", sort=False, dropna=False)
        .agg(_order=("_order", "first"), kind=("kind", "first"), dup_count=("dup_count", "first"), **aggs)
    )
    if "_correct" in out:
        out[share] = (out.pop("_correct") / out.pop("_replicated").replace(0, np.nan)).astype(float)
    return out.sort_values(["_order", "kind", "dup_count"], na_position="first").drop(columns="_order").reset_index()


def detection_by_dup_count(prompts_df: pd.DataFrame, path: str | Path, threshold: float | None = None) -> Path:
    """Bar charts of :func:`dup_count_table`: share flagged memorised and mean max score per category.

    Shows whether detection rises with the known number of training copies, as it should.
    """
    from matplotlib.figure import Figure

    table = dup_count_table(prompts_df)
    x = np.arange(len(table))
    fig = Figure(figsize=(max(6.4, 1.0 + 1.5 * len(table)), 3.6), layout="constrained")
    ax_flag, ax_score = fig.subplots(1, 2)
    bars = ax_flag.bar(x, table["flagged_share"], color=_FLAG_COLOR, alpha=0.8)
    ax_flag.bar_label(bars, labels=[f"n={n}" for n in table["prompts"]], fontsize=7)
    ax_flag.set_ylim(0, 1.12)
    ax_flag.set_ylabel("share of prompts flagged memorised")
    ax_score.bar(x, table["mean_max_score"], color=_GEN_COLOR, alpha=0.8)
    ax_score.set_ylabel("mean of prompts' max score")
    if threshold is not None:
        ax_score.axhline(threshold, color=_FLAG_COLOR, linestyle="--", label=f"threshold {threshold:g}")
        ax_score.legend(frameon=False, fontsize=8)
    for ax in (ax_flag, ax_score):
        ax.set_xticks(x, table["category"], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("prompt category (known duplication count)")
    return save_figure(fig, path)


def _tile(file: Any, size: int) -> Image.Image:
    """The image at ``file`` as RGB, upscaled (NEAREST) or downscaled to fit ``size``; grey if missing."""
    if file is None or (isinstance(file, float) and math.isnan(file)) or not Path(file).is_file():
        return Image.new("RGB", (size, size), (200, 200, 200))
    with Image.open(file) as opened:
        opened.draft("RGB", (size, size))  # a JPEG decodes at the smallest scale still >= size
        img = opened.convert("RGB")
    scale = size / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(new, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def image_grid(pairs: Iterable, path: str | Path, size: int = 96, cols: int = 4) -> Path:
    """A PNG of (generated | nearest training image) pairs, ``cols`` per row, each with its label.

    ``pairs``: :class:`GridPair` or plain ``(generated, reference, label[, highlight])`` tuples.
    Images are scaled to ``size`` px (NEAREST when enlarging, so 32x32 pixels stay crisp).
    """
    pairs = [GridPair(*p) for p in pairs]
    pad, text_h, border = 6, 30, 3
    cell_w, cell_h = 2 * size + 3 * border + 2, size + 2 * border + text_h
    n_cols = max(1, min(cols, len(pairs)))
    n_rows = max(1, math.ceil(len(pairs) / n_cols))
    canvas = Image.new("RGB", (pad + n_cols * (cell_w + pad), pad + n_rows * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for i, pair in enumerate(pairs):
        x0 = pad + (i % n_cols) * (cell_w + pad)
        y0 = pad + (i // n_cols) * (cell_h + pad)
        frame = (214, 39, 40) if pair.highlight else (190, 190, 190)
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + size + 2 * border - 1], fill=frame)
        for j, file in enumerate((pair.generated, pair.reference)):
            canvas.paste(_tile(file, size), (x0 + border + j * (size + border + 2), y0 + border))
        draw.multiline_text((x0 + 2, y0 + size + 2 * border + 2), pair.label, fill="black", font=font, spacing=2)
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def probe_figure(tables: dict, metrics: dict, path: Path, threshold: float) -> Path | None:
    """A bar chart of MR and similarity per row of the probe's summary (what people look at)."""
    from matplotlib.figure import Figure

    if "finding_dori" in tables:
        t = tables["finding_dori"]
        labels = [
            f"{m}\n{'attacked' if a.startswith('trigger') else 'as is'}" + ("\n(control)" if "control" in a else "")
            for m, a in zip(t["model"], t["attack"])
        ]
        mrs, sims = t["mr"].to_numpy(), t["similarity"].to_numpy()
    else:
        rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and "mr" in v}
        if not rows:
            return None
        labels, mrs, sims = list(rows), [v["mr"] for v in rows.values()], [v["similarity"] for v in rows.values()]
    fig = Figure(figsize=(max(4.5, 1.6 * len(labels)), 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    x = np.arange(len(labels))
    ax1.bar(x, mrs, color="#c44e52")
    ax1.set(ylim=(0, 1.05), ylabel="memorisation rate", xticks=x)
    ax1.set_xticklabels(labels, fontsize=7)
    ax2.bar(x, sims, color="#4c72b0")
    ax2.axhline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax2.set(ylabel="mean similarity to training image", xticks=x)
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def mitigation_figure(table: pd.DataFrame, path: Path, reference: str) -> Path:
    """Three panels per model: MR as prompted, MR under trigger search, FD relative to the reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(table) + 2), 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.arange(len(table))
    for ax, col, title, color in (
        (axes[0], "mr", "MR (original prompts)", "#c44e52"),
        (axes[1], "mr_attacked", "MR under trigger search", "#8c2d04"),
        (axes[2], "fd_ratio", f"FD / FD of {reference}", "#4c72b0"),
    ):
        ax.bar(x, table[col].to_numpy(), color=color)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(table["model"], rotation=60, ha="right", fontsize=7)
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylim(0, 1.05)
    axes[2].axhline(1.1, color="k", linestyle="--", linewidth=1, label="+10 %")
    axes[2].legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def pareto_figure(trials: pd.DataFrame, runs: pd.DataFrame, path: Path) -> Path:
    """MemControl's trials (front joined), and the other fine-tuning runs as labelled points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.scatter(trials["memorisation"], trials["fd"], s=18, color="#bbbbbb", label="MemControl trials")
    front = trials[trials["pareto"]].sort_values("memorisation")
    ax.plot(front["memorisation"], front["fd"], "o-", color="#c44e52", label="MemControl Pareto front")
    for _, r in runs.iterrows():
        ax.scatter([r["memorisation"]], [r["fd"]], marker="s", s=36, zorder=3)
        ax.annotate(r["run"], (r["memorisation"], r["fd"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set(
        xlabel="memorisation: noise norm on memorised prompts (lower = less)",
        ylabel="FD on held-out captions (lower = better)",
    )
    ax.legend(frameon=False, fontsize=7)
    return save_figure(fig, path)


def roc_figure(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """The ROC curve of a labelled ``scores`` table as a PNG (matplotlib ``Figure``, no pyplot)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import auc

    from diffmem.metrics.detection import roc_points

    known = table[table["label"].notna()]
    fprs, tprs, _ = roc_points(known["score"].to_numpy(float), known["label"].to_numpy(int))
    fig = Figure(figsize=(4.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(fprs, tprs, color="#1f77b4", linewidth=2, label=f"AUC = {auc(fprs, tprs):.3f}")
    ax.plot([0, 1], [0, 1], color="#7f7f7f", linestyle="--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", frameon=False)
    return save_figure(fig, path)


def generalisation_figure(table: pd.DataFrame, n_star: float | None, path: Path, feature: str) -> Path:
    """Both similarities (mean, interquartile band) against n on a log axis; the transition marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for col, label, color in (
        ("cross_sim", "model A vs model B, same noise", "#1f77b4"),
        ("nn_sim", "sample vs nearest own training image", "#d62728"),
    ):
        ax.plot(table.n, table[col], "o-", color=color, label=label)
        ax.fill_between(table.n, table[f"{col}_q25"], table[f"{col}_q75"], color=color, alpha=0.15)
    ax.plot(table.n, table.shuffled_sim, ":", color="#7f7f7f", label="A vs B, different noises")
    ax.plot(table.n, table.heldout_nn_sim, ":", color="#d62728", label="held-out real image vs nearest (novel)")
    ax.plot(table.n, table.vae_ceiling, "--", color="#2ca02c", lw=1, label="VAE reconstruction (copy ceiling)")
    if n_star is not None:
        ax.axvline(n_star, color="k", lw=1, ls="--", label=f"transition n = {n_star:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(table.n, [str(n) for n in table.n])
    ax.set_xlabel("training images per model (n)")
    ax.set_ylabel(f"{feature} similarity")
    ax.legend(frameon=False, fontsize=8)
    return save_figure(fig, path)
