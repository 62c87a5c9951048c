"""Ground-truth labels of prompt tables: which prompts count as memorised (``positives`` configs).

Prompt lists carry ``memorisation_type`` / ``is_memorised`` (:mod:`diffmem.data.prompt_lists`
maps their schemas); testbed prompts carry ``kind`` / ``dup_count``. :func:`ground_truth_labels`
turns either into the 1 (memorised) / 0 (not) labels the detection metrics
(:mod:`diffmem.metrics.detection`) score. Data-layer vocabulary, so prompt loading and target
selection need no metric.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from diffmem.checks import did_you_mean
from diffmem.errors import ConfigError

#: the fields of a ``positives`` config (``conf/positives/default.yaml``)
POSITIVES_FIELDS = ("memorised", "not_memorised", "exclude", "min_dup_count")
#: the ground-truth vocabulary of memorisation types (:mod:`diffmem.data.prompt_lists`)
TYPES = ("verbatim", "template", "none")
#: a testbed prompt's measured copy share (``memorisation.json``), refining its hard negatives
COPY_SHARE = "copy_share"


def check_positives(positives: Mapping | None) -> dict:
    """``positives`` as a dict with exactly the fields of :data:`POSITIVES_FIELDS`, types known."""
    pos = dict(positives) if positives else {}
    unknown = set(pos) - set(POSITIVES_FIELDS)
    if unknown:
        raise ConfigError(
            f"positives: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(POSITIVES_FIELDS)})"
        )
    missing = [f for f in POSITIVES_FIELDS if f not in pos]
    if missing:
        raise ConfigError(
            f"positives: missing field(s) {', '.join(missing)} (select a ground truth, e.g. positives=default)"
        )
    for field in ("memorised", "not_memorised", "exclude"):
        pos[field] = [str(t) for t in (pos[field] or ())]
        bad = sorted(set(pos[field]) - set(TYPES))
        if bad:
            raise ConfigError(
                f"positives.{field}: '{bad[0]}' is not a memorisation type "
                f"({', '.join(TYPES)}){did_you_mean(bad[0], TYPES)}"
            )
    both = set(pos["memorised"]) & set(pos["not_memorised"])
    if both:
        raise ConfigError(f"positives: memorised and not_memorised overlap ({', '.join(sorted(both))})")
    return pos


def ground_truth(prompts: pd.DataFrame, min_dup_count: float) -> pd.DataFrame | None:
    """``memorisation_type``, ``is_memorised`` and ``hard_negative`` per prompt; None without
    ground-truth columns.

    Prompt lists carry the first two (:mod:`diffmem.data.prompt_lists` maps their schemas) and
    may carry ``hard_negative``. Testbed prompts (``kind`` + ``dup_count``): canaries copied at
    least ``min_dup_count`` times are verbatim, rarer canaries ``none`` and hard negatives,
    templates template, ordinary and held-out prompts none. With a ``copy_share`` column (the
    model's measured copies, ``metrics.memorisation.with_copy_shares``), a rarer canary with
    any copy is neither a hard negative nor a negative: its type is unknown and it is left out.
    """
    if "memorisation_type" in prompts or "is_memorised" in prompts:
        types = prompts.get("memorisation_type", pd.Series(np.nan, index=prompts.index))
        memorised = prompts.get("is_memorised", (types != "none").where(types.notna()))
        hard = prompts.get("hard_negative", pd.Series(False, index=prompts.index))
    elif "kind" in prompts and "dup_count" in prompts:
        dup = pd.to_numeric(prompts["dup_count"], errors="coerce").fillna(0)
        canary, kind = prompts["kind"] == "canary", prompts["kind"]
        types = pd.Series(
            np.select(  # type: ignore[call-overload]  # numpy types no None default; it makes an object array
                [
                    canary & (dup >= float(min_dup_count)),
                    canary,
                    kind == "template",
                    kind.isin(["ordinary", "heldout"]),
                ],
                ["verbatim", "none", "template", "none"],
                None,
            ),
            index=prompts.index,
        )
        hard = canary & (dup < float(min_dup_count))
        if COPY_SHARE in prompts:  # measured: a rare canary the model copies is no hard negative
            copied = hard & pd.to_numeric(prompts[COPY_SHARE], errors="coerce").fillna(0).gt(0)
            types, hard = types.mask(copied), hard & ~copied  # type unknown: left out of every AUC
        memorised = (types != "none").where(types.notna())
    else:
        return None
    return pd.DataFrame(
        {
            "memorisation_type": types.where(types.notna(), None),
            "is_memorised": memorised,
            "hard_negative": hard.fillna(False).astype(bool),
        },
        index=prompts.index,
    )


def ground_truth_labels(prompts: pd.DataFrame, positives: Mapping | None) -> pd.Series | None:
    """Per prompt 1.0 (memorised), 0.0 (not) or NaN (left out); None without ground-truth columns.

    A prompt is positive when its memorisation type is in ``memorised`` (or, type unknown, it
    is memorised by its file's label), negative when its type is in ``not_memorised`` (or,
    type unknown, its file is labelled negative), and left out when its type is in
    ``exclude``, in neither list, or when it is a hard negative (scored on its own by detect).
    """
    pos = check_positives(positives)
    gt = ground_truth(prompts, pos["min_dup_count"])
    if gt is None:
        return None
    types, known = gt["memorisation_type"], gt["memorisation_type"].notna()
    memorised = gt["is_memorised"].astype(object)
    is_pos = types.isin(pos["memorised"]) | (~known & (memorised == True))  # noqa: E712 (NaN-safe)
    is_neg = types.isin(pos["not_memorised"]) | (~known & (memorised == False))  # noqa: E712
    left_out = types.isin(pos["exclude"]) | gt["hard_negative"]
    labels = pd.Series(np.nan, index=prompts.index, name="label")
    labels[is_neg & ~left_out] = 0.0
    labels[is_pos & ~left_out] = 1.0
    return labels


def describe_positives(prompts: pd.DataFrame, positives: Mapping | None) -> str:
    """A one-line description of what counts as memorised, for ``metrics.json``."""
    pos = check_positives(positives)
    line = f"memorisation_type in {pos['memorised']} vs {pos['not_memorised']}" + (
        f", {pos['exclude']} left out" if pos["exclude"] else ""
    )
    if "kind" in prompts and "dup_count" in prompts and "memorisation_type" not in prompts:
        line += (
            f" (testbed: canaries with dup_count >= {pos['min_dup_count']} verbatim, rarer ones "
            "hard negatives, templates template, ordinary and held-out none)"
        )
    return line
