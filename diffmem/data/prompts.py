"""Prompt lists: plain text, JSON lines (public memorised-prompt lists), ``;``-CSV (NeMo), TSV,
Parquet (Webster et al.); the testbed's and a dataset's own prompts (:mod:`.prompt_lists`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import OmegaConf

from diffmem.checks import check_positive
from diffmem.data.datasets import TESTBED_KINDS, _read_table, check_regular, load_dataset
from diffmem.data.inputs import blank_caption, check_inside
from diffmem.data.prompt_lists import (
    check_files,
    prompts_from_dataset,
    record_lines,
    resolve_targets,
    with_ground_truth,
)
from diffmem.errors import ConfigError, DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
KINDS = ("auto", "testbed", "dataset", "file")
#: above this many prompts a stage says so (with the images it will make) before it starts
LARGE_PROMPTS = 10_000


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError(f"prompts.format '{fmt}' is not one of auto, {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    return {"json": "jsonl", "jsonl": "jsonl", "csv": "csv", "tsv": "tsv", "parquet": "parquet"}.get(suffix, "txt")


def read_prompt_file(path: str | Path, fmt: str = "auto") -> pd.DataFrame:
    """``prompt_id, caption`` plus every other column the file carries (index, url, type, target_file...)."""
    path = Path(path)
    fmt = _format_of(path, fmt)
    check_regular(path)
    if fmt == "txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a leading BOM is dropped
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        kept = [(n, s.strip()) for n, s in enumerate(lines, 1) if s.strip()]
        df = pd.DataFrame({"caption": [s for _, s in kept]})
    else:
        native = path.suffix.lower().lstrip(".") in ({"jsonl", "json"} if fmt == "jsonl" else {fmt})
        df = _normalise(_read_table(path) if native else _read_as(path, fmt), path)
    if df.empty:
        raise DataError(f"{path}: the prompt list is empty")
    blank = df["caption"].map(lambda c: not isinstance(c, str) or blank_caption(c))
    if blank.any():
        line = record_lines(path, fmt)[int(blank.values.argmax())]
        raise DataError(
            f"{path}: {'row' if fmt == 'parquet' else 'line'} {line}: empty caption "
            "(nothing but whitespace, control or zero-width characters)"
        )
    df.insert(0, "prompt_id", range(len(df)))
    return df.reset_index(drop=True)


def _read_as(path: Path, fmt: str) -> pd.DataFrame:
    """Read a file whose suffix does not say its format."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        alias = Path(tmp) / f"prompts.{fmt}"
        shutil.copyfile(path, alias)
        try:
            return _read_table(alias)
        except DataError as err:
            raise DataError(str(err).replace(str(alias), str(path))) from err


def _normalise(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    if table.empty and not len(table.columns):
        raise DataError(f"{path}: the prompt list is empty")
    cols = {c.lower(): c for c in table.columns}
    if "caption" not in cols and "prompt" not in cols and "text" not in cols:
        raise DataError(f"{path}: no 'caption' column (found: {', '.join(map(str, table.columns)) or 'none'})")
    key = cols.get("caption") or cols.get("prompt") or cols["text"]
    for row, value in enumerate(table[key], 1):
        if not (isinstance(value, str) or (pd.api.types.is_scalar(value) and pd.isna(value))):
            raise DataError(f"{path}: row {row}: the caption is {type(value).__name__} {value!r}, not a string")
    out = pd.DataFrame({"caption": table[key].where(table[key].isna(), table[key].astype(str))})
    for name in table.columns.drop(key):  # every column kept; a `prompt_id` of the file's own is renamed
        out["source_prompt_id" if name == "prompt_id" else name] = table[name].values
    for name in ("max_sscd", "mean_sscd"):
        if name in out:
            out[name] = pd.to_numeric(out[name].replace("", None), errors="coerce")
    return out


def warn_long_prompts(captions: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> int:
    """Warn once, with the count, when captions are longer than ``tokenizer`` takes (the text
    encoder sees them cut); returns that count."""
    limit = int(tokenizer.model_max_length)
    captions = list(captions)
    n = sum(len(ids) > limit for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"])
    if n:
        log.warning(
            "%d of %d prompts are longer than the tokenizer's %d tokens; the text encoder sees them cut",
            n,
            len(captions),
            limit,
        )
    return n


def prompts_from_testbed(
    manifest: pd.DataFrame, n_ordinary: int = 16, n_heldout: int = 16, seed: int = 0
) -> pd.DataFrame:
    """Every canary/template caption, some trained ordinary captions and unseen held-out ones."""
    first = manifest.drop_duplicates("caption")
    special = first[first["kind"].isin(["canary", "template"])]
    ordinary = first[first["kind"] == "ordinary"]
    trained = set(manifest.loc[manifest["split"] == "train", "caption"])
    heldout = first[(first["kind"] == "heldout") & ~first["caption"].isin(trained)]
    parts = [
        special,
        ordinary.sample(min(n_ordinary, len(ordinary)), random_state=seed),
        heldout.sample(min(n_heldout, len(heldout)), random_state=seed),
    ]
    df = pd.concat(parts)[["caption", "kind", "group", "dup_count", "image_id", "file"]]
    df = df.rename(columns={"image_id": "target_id", "file": "target_file"})
    df.insert(0, "prompt_id", range(len(df)))
    return df.reset_index(drop=True)


def prompt_kind(prompts_cfg: DictConfig, data_kind: str) -> str:
    """``prompts.kind`` with ``auto`` resolved: the testbed's prompts on testbed data, else the
    dataset's own captions."""
    kind = prompts_cfg.kind
    if kind not in KINDS:
        raise ConfigError(f"prompts.kind '{kind}' is not one of {', '.join(KINDS)}")
    if kind == "auto":
        return "testbed" if data_kind in TESTBED_KINDS else "dataset"
    return kind


def needs_dataset(cfg: DictConfig) -> bool:
    """Whether a stage's prompts (``cfg.prompts``) are drawn from its dataset (``cfg.data``)."""
    return prompt_kind(cfg.prompts, cfg.data.kind) in ("testbed", "dataset")


def read_prompt_files(files: Iterable[Any], fmt: str = "auto") -> pd.DataFrame:
    """Several prompt lists as one table, each with its ``label`` (``positive``, ``negative`` or
    null: from its columns) and its ``source`` file; ``prompt_id`` runs over all of them."""
    parts = []
    for entry in check_files(files):
        df = read_prompt_file(entry["path"], fmt).drop(columns="prompt_id")
        parts.append(with_ground_truth(df, Path(entry["path"]), entry["label"]).assign(source=entry["path"]))
    df = one_row_per_prompt(pd.concat(parts, ignore_index=True))
    df.insert(0, "prompt_id", range(len(df)))
    return df


def one_row_per_prompt(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with each prompt (its caption, stripped) once, the first row kept, with one log
    line; a prompt labelled memorised in one row and not in another is refused naming both
    sources (it would be scored in both classes)."""
    key = df["caption"].str.strip()
    if "is_memorised" in df:
        known = df["is_memorised"].notna()
        labels = df.loc[known, "is_memorised"].astype(bool).groupby(key[known]).nunique()
        if (labels > 1).any():
            caption = labels.index[(labels > 1).values.argmax()]
            rows = df[known & (key == caption)]
            src = {bool(m): s for m, s in zip(rows["is_memorised"], rows["source"])}
            raise DataError(
                f"prompt {caption!r} is labelled memorised in {src[True]} and not memorised in "
                f"{src[False]}; remove it from one of them"
            )
    dup = key.duplicated()
    if dup.any():
        log.warning(
            "%d of %d prompts are listed more than once (first: %r); each is counted once",
            int(dup.sum()),
            len(df),
            df["caption"][dup].iloc[0],
        )
    return df[~dup].reset_index(drop=True)


def load_prompts(cfg: DictConfig, manifest: pd.DataFrame | None = None, data_kind: str = "testbed") -> pd.DataFrame:
    """The prompt table for a ``prompts`` config (``manifest``: the dataset's, when the kind
    needs it; ``data_kind`` resolves ``prompts.kind=auto``)."""
    kind = prompt_kind(cfg, data_kind)
    if kind in ("testbed", "dataset") and manifest is None:
        raise ConfigError(f"prompts={kind} needs the dataset (data=...)")
    if kind == "testbed":
        assert manifest is not None  # refused above
        if not {"kind", "split", "dup_count"} <= set(manifest.columns):
            raise ConfigError(
                "prompts=testbed needs the testbed dataset (data=testbed); for other data "
                "use prompts=dataset (its captions) or prompts=file prompts.path=<prompt list>"
            )
        return prompts_from_testbed(manifest, cfg.n_ordinary, cfg.n_heldout)
    if kind == "dataset":
        limit = check_positive(cfg.get("max_prompts"), "prompts.max_prompts", optional=True)
        return prompts_from_dataset(manifest, limit, int(cfg.get("seed", 0)))
    if kind == "file":
        if not cfg.get("path") and not cfg.get("files"):
            raise ConfigError(
                "prompts=file needs prompts.path=<prompt list> or "
                "prompts.files=[{path: <file>, label: positive|negative|null}, ...]"
            )
        if cfg.get("path") and cfg.get("files"):
            raise ConfigError("prompts: set prompts.path or prompts.files, not both")
        limit = check_positive(cfg.get("limit"), "prompts.limit", optional=True)
        files: Any = (  # a list of entries as written (check_files refuses others)
            OmegaConf.to_container(cfg.files, resolve=True)
            if cfg.get("files")
            else [{"path": cfg.path, "label": cfg.get("label")}]
        )
        df = resolve_targets(read_prompt_files(files, cfg.get("format", "auto")), manifest)
        return df.head(int(limit)) if limit is not None else df


def stage_prompts(cfg: DictConfig, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
    """A stage's prompt table (``cfg.prompts`` over ``cfg.data``; the dataset is loaded here
    when the prompts need it and ``manifest`` is not given); an empty table is refused."""
    if manifest is None and needs_dataset(cfg):
        manifest = load_dataset(cfg.data)[1]
    prompts = load_prompts(cfg.prompts, manifest, cfg.data.kind)
    if prompts.empty:
        raise DataError(f"{cfg.get('stage', 'prompts')}: the prompt list is empty")
    if len(prompts) > LARGE_PROMPTS:
        n = cfg.get("n_per_prompt")
        images = f" x n_per_prompt={n} = {len(prompts) * int(n):,} images" if isinstance(n, int) else ""
        log.warning(
            "%s: %s prompts%s: a large run (the progress bar gives the rate and the time left; "
            "prompts.limit or prompts.max_prompts take fewer)",
            cfg.get("stage", "prompts"),
            f"{len(prompts):,}",
            images,
        )
    if "target_file" in prompts and prompt_kind(cfg.prompts, cfg.data.kind) == "file" and cfg.data.get("root"):
        check_targets_inside(prompts, cfg.data.root, bool(cfg.data.get("allow_outside_root", False)))
    return prompts


def check_targets_inside(prompts: pd.DataFrame, root: str | Path, allow_outside_root: bool = False) -> None:
    """A prompt list's ``target_file`` (a training image, relative to ``data.root``) must stay
    inside ``data.root``, as manifest rows do (:func:`~diffmem.data.inputs.check_inside`)."""
    for i, file in enumerate(prompts["target_file"]):
        if isinstance(file, str) and file:
            source = prompts["source"].iloc[i] if "source" in prompts else "the prompt list"
            check_inside(
                Path(root),
                file,
                f"{source}: prompt {i + 1} ({prompts['caption'].iloc[i]!r}): target_file ",
                allow_outside_root,
            )
