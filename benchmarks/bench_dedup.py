#!/usr/bin/env python
"""Embedding (and dedup) of a folder of camera-sized JPEGs with known edited copies, against Immaculate.

The folder (:func:`make_folder`, deterministic for a seed): ``--n`` JPEGs 700-1100 px on the
long side in camera aspect ratios. Each original is a mosaic of crops of the photos
scikit-image and matplotlib ship (so originals are distinct); about a quarter of the images
are edited copies of an original (crop, down-scale, JPEG re-encode, small colour change),
listed in ``pairs.csv``.

Sections (``--section``, default all):

- ``embed``: ``diffmem embed data=folder features=<--features>`` in a fresh process; with
  ``--compare-src``, the same from another checkout (e.g. main before a change); when
  ``--immaculate`` (or ``$IMMACULATE``) names its CLI, Immaculate's whole dedup
  (``--method sscd_distilled``) on the same folder. They alternate, ``--repeats`` runs
  each: median wall seconds, images/s, CPU seconds (user + system of the process and its
  children) and peak RSS, and the recall / precision of the copy pairs at ``--threshold``
  from diffmem's vectors. Immaculate needs Python 3.12, so it lives in its own venv
  (``python3.12 -m venv /work/imm312 && /work/imm312/bin/pip install 'immaculate[sscd]==0.3.0'``);
  without it that part is skipped.
- ``dedup``: ``diffmem dedup`` against Immaculate's ``--json`` groups at the same threshold (0.75
  for ``sscd_distilled``): CPU seconds, peak RSS, the share of copies grouped with their
  original, and groups that mix distinct photos; ``--compare-src`` as for ``embed``.

    python benchmarks/bench_dedup.py --n 500 --immaculate /work/imm312/bin/immaculate
    python benchmarks/bench_dedup.py --section embed --folder /tmp/photos --compare-src /path/to/main
    python benchmarks/bench_dedup.py --section dedup --n 500 --immaculate /work/imm312/bin/immaculate
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffmem.runs import write_json

REPO = Path(__file__).resolve().parent.parent
ASPECTS = [(4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (1, 1)]
#: the sections; section ``name`` is ``section_<name>(args, folder, made, work) -> dict``
SECTIONS = ("embed", "dedup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--n", type=int, default=500, help="JPEGs in the folder (originals + copies)")
    p.add_argument("--folder", default=None, help="reuse (or create) the folder here instead of a temporary one")
    p.add_argument("--features", default="sscd_distilled")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads of diffmem")
    p.add_argument("--repeats", type=int, default=3, help="runs of each tool (alternating); medians reported")
    p.add_argument("--threshold", type=float, default=0.75, help="cosine above which a pair is called a copy")
    p.add_argument(
        "--compare-src",
        default=None,
        help="another diffmem checkout (e.g. main before a change) whose runs alternate with this one's",
    )
    p.add_argument(
        "--immaculate",
        default=os.environ.get("IMMACULATE"),
        help="Immaculate's CLI (needs Python 3.12; skipped when unset or absent)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_dedup.json"))
    return p.parse_args(argv)


# -- the folder -----------------------------------------------------------------------------


def _source_photos() -> list[np.ndarray]:
    """The colour and grey photos scikit-image and matplotlib ship, as RGB arrays."""
    sys.path.insert(0, str(REPO))
    from diffmem.data.photos import OTHER_PHOTOS, PHOTOS, natural_photos

    return list(natural_photos(PHOTOS + OTHER_PHOTOS, max_side=2048).values())


def _original(photos: list[np.ndarray], rng: np.random.Generator):
    """A camera-sized mosaic of 2-4 random crops of ``photos`` (a PIL image)."""
    from PIL import Image, ImageOps

    aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
    long = int(rng.integers(700, 1101))
    w, h = (long, long * ah // aw) if aw >= ah else (long * aw // ah, long)
    canvas = Image.new("RGB", (w, h))
    cols, rows = [(1, 2), (2, 1), (2, 2)][rng.integers(3)]
    xs, ys = np.linspace(0, w, cols + 1).astype(int), np.linspace(0, h, rows + 1).astype(int)
    for r in range(rows):
        for c in range(cols):
            photo = photos[rng.integers(len(photos))]
            tw, th = xs[c + 1] - xs[c], ys[r + 1] - ys[r]
            ph, pw = photo.shape[:2]
            scale = min(ph / th, pw / tw) * rng.uniform(0.3, 1.0)
            ch, cw = max(8, int(th * scale)), max(8, int(tw * scale))
            y, x = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
            tile = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((int(tw), int(th)), Image.BICUBIC)
            if rng.random() < 0.5:
                tile = ImageOps.mirror(tile)
            canvas.paste(tile, (int(xs[c]), int(ys[r])))
    return canvas


def _edit(im, rng: np.random.Generator):
    """An edited copy of ``im``: crop, down-scale, small colour change, then a JPEG re-encode;
    returns (image, a short description)."""
    from PIL import Image, ImageEnhance

    done = []
    if rng.random() < 0.6:
        f = rng.uniform(0.7, 0.95)
        w, h = int(im.width * f), int(im.height * f)
        x, y = int(rng.integers(im.width - w + 1)), int(rng.integers(im.height - h + 1))
        im, _ = im.crop((x, y, x + w, y + h)), done.append(f"crop{f:.2f}")
    if rng.random() < 0.6:
        s = rng.uniform(0.5, 0.9)
        im, _ = im.resize((int(im.width * s), int(im.height * s)), Image.BILINEAR), done.append(f"resize{s:.2f}")
    if rng.random() < 0.5:
        b, c = rng.uniform(0.85, 1.15, size=2)
        im = ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(b)).enhance(c)
        done.append(f"colour{b:.2f},{c:.2f}")
    q = int(rng.integers(40, 80))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    done.append(f"jpeg{q}")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), "+".join(done)


def make_folder(root: str | Path, n: int = 500, seed: int = 0, copy_share: float = 0.25) -> dict:
    """Write ``n`` JPEGs under ``root/images`` (originals, and ``copy_share`` of ``n`` edited
    copies of random originals), ``root/captions.tsv`` (what ``data=folder`` reads) and
    ``root/pairs.csv`` (copy, original, edit). Returns ``{"files", "pairs"}`` (pairs as
    (copy index, original index)). Deterministic for ``seed``; an existing complete folder is reused."""
    root = Path(root)
    meta = root / "folder.json"
    key = {"n": n, "seed": seed, "copy_share": copy_share, "version": 1}
    if meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return json.loads(meta.read_text())
    rng = np.random.default_rng(seed)
    photos = _source_photos()
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_copies = int(round(n * copy_share))
    n_orig = n - n_copies
    images, files, pairs, edits = [], [], [], []
    for i in range(n_orig):
        images.append(_original(photos, rng))
        files.append(f"images/{i:05d}.jpg")
        images[-1].save(root / files[-1], quality=int(rng.integers(85, 96)))
    for j in range(n_copies):
        src = int(rng.integers(n_orig))
        im, what = _edit(images[src], rng)
        files.append(f"images/{n_orig + j:05d}.jpg")
        im.save(root / files[-1], quality=95)
        pairs.append((n_orig + j, src))
        edits.append(what)
    order = rng.permutation(n)  # copies interleaved with originals, as in a real folder
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    files = [files[k] for k in order]
    pairs = [(int(rank[c]), int(rank[o])) for c, o in pairs]
    (root / "captions.tsv").write_text("file\tcaption\n" + "".join(f"{f}\tphoto {i}\n" for i, f in enumerate(files)))
    (root / "pairs.csv").write_text(
        "copy,original,edit\n" + "".join(f"{files[c]},{files[o]},{e}\n" for (c, o), e in zip(pairs, edits))
    )
    out = {"files": files, "pairs": pairs}
    meta.write_text(json.dumps({**out, "key": key}))
    return out


# -- measuring a command ------------------------------------------------------------------------


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (user + system, children included) and peak RSS (MB)
    of that process alone (``os.wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "output": out.decode(errors="replace"),
    }


def medians(runs: list[dict], n: int) -> dict:
    out = {k: float(np.median([r[k] for r in runs])) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
    out["images_per_s"] = n / out["wall_s"]
    out["runs"] = [{k: round(r[k], 3) for k in ("wall_s", "cpu_s", "peak_rss_mb")} for r in runs]
    return out


def alternate(tools: dict, repeats: int, section: str) -> dict[str, list[dict]]:
    """``repeats`` runs of every tool (``tool(r) -> measure(...)``), taking turns, each printed."""
    runs: dict[str, list[dict]] = {k: [] for k in tools}
    for r in range(repeats):
        for name, tool in tools.items():
            runs[name].append(tool(r))
            print(
                f"{section} {name} run {r}: {runs[name][-1]['wall_s']:.1f} s, {runs[name][-1]['cpu_s']:.1f} CPU-s, "
                f"{runs[name][-1]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    return runs


# -- the embed section -----------------------------------------------------------------------


def _env(src: Path, threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}


def diffmem_tools(args, work: Path, name: str, cmd) -> dict:
    """The runs of this checkout's ``cmd(out)`` (into ``work/<name><run>``) and, with
    ``--compare-src``, of the other checkout's (``work/compare<run>``), for :func:`alternate`."""
    tools = {"diffmem": lambda r: measure(cmd(work / f"{name}{r}"), _env(REPO, args.threads), cwd=REPO)}
    if args.compare_src:
        src = Path(args.compare_src)
        tools["diffmem_compare"] = lambda r: measure(cmd(work / f"compare{r}"), _env(src, args.threads), cwd=src)
    return tools


def diffmem_embed_cmd(folder: Path, out: Path, features: str, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffmem.cli",
        "embed",
        "data=folder",
        f"data.root={folder}",
        "data.manifest=captions.tsv",
        f"features={features}",
        f"paths.output_dir={out}",
        f"threads={threads}",
        "device=cpu",
    ]


def immaculate_cmd(exe: str, folder: Path) -> list[str]:
    return [exe, "--method", "sscd_distilled", str(folder / "images")]


def pair_metrics(vectors: np.ndarray, pairs: list[tuple[int, int]], threshold: float) -> dict:
    """Recall of the known copy pairs and precision of all pairs with cosine > ``threshold``."""
    sims = vectors @ vectors.T
    iu = np.triu_indices(len(vectors), 1)
    called = {(int(a), int(b)) for a, b in zip(*iu) if sims[a, b] > threshold}
    truth = {(min(c, o), max(c, o)) for c, o in pairs}
    # copies of one original are copies of each other too
    by_orig: dict[int, list[int]] = {}
    for c, o in pairs:
        by_orig.setdefault(o, []).append(c)
    for cs in by_orig.values():
        truth |= {(min(a, b), max(a, b)) for a in cs for b in cs if a != b}
    hit = len(called & truth)
    return {
        "threshold": threshold,
        "true_pairs": len(truth),
        "called_pairs": len(called),
        "recall": hit / max(len(truth), 1),
        "precision": hit / max(len(called), 1),
        "copy_pair_cos_median": float(np.median([sims[c, o] for c, o in pairs])) if pairs else None,
    }


def section_embed(args, folder: Path, made: dict, work: Path) -> dict:
    """diffmem embed and Immaculate's dedup, alternating; medians."""
    exe = args.immaculate if args.immaculate and shutil.which(args.immaculate) else None
    if args.immaculate and exe is None:
        print(f"immaculate: {args.immaculate} not found; skipped", flush=True)
    n = len(made["files"])
    tools = diffmem_tools(args, work, "embed", lambda out: diffmem_embed_cmd(folder, out, args.features, args.threads))
    if exe:
        tools["immaculate"] = lambda r: measure(immaculate_cmd(exe, folder))
    runs = alternate(tools, args.repeats, "embed")
    sys.path.insert(0, str(REPO))
    from diffmem.features.store import FeatureStore

    vectors, ids, _ = FeatureStore(next((work / "embed0").rglob("info.json")).parent).load()
    order = {f: i for i, f in enumerate(ids["file"])}
    vectors = vectors[[order[f] for f in made["files"]]]
    result = {
        "n_images": n,
        "features": args.features,
        "threads": args.threads,
        "diffmem_embed": {**medians(runs["diffmem"], n), **pair_metrics(vectors, made["pairs"], args.threshold)},
    }
    if args.compare_src:
        result["diffmem_compare"] = {"src": args.compare_src, **medians(runs["diffmem_compare"], n)}
    if exe:
        result["immaculate_dedup"] = medians(runs["immaculate"], n)
        result["immaculate_output_tail"] = runs["immaculate"][-1]["output"][-1500:]
        result["cpu_ratio"] = result["diffmem_embed"]["cpu_s"] / result["immaculate_dedup"]["cpu_s"]
    return result


# -- the dedup section -----------------------------------------------------------------------


def diffmem_dedup_cmd(folder: Path, out: Path, features: str, threads: int, threshold: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "diffmem.cli",
        "dedup",
        "data=folder",
        f"data.root={folder}",
        "data.manifest=captions.tsv",
        f"features={features}",
        f"threshold={threshold}",
        f"paths.output_dir={out}",
        f"threads={threads}",
        "device=cpu",
    ]


def grouped_share(groups: list[list[str]], pairs: list[tuple[int, int]], files: list[str]) -> dict:
    """Of the known (copy, original) pairs, the share whose two files share a group; and how
    many groups mix files that are no copies of one another (by file name)."""
    group_of = {Path(f).name: g for g, members in enumerate(groups) for f in members}
    name = [Path(f).name for f in files]
    together = [group_of.get(name[c]) is not None and group_of.get(name[c]) == group_of.get(name[o]) for c, o in pairs]
    family = {i: i for i in range(len(files))}
    for c, o in pairs:
        family[c] = o
    index = {n: i for i, n in enumerate(name)}
    mixed = sum(len({family[index[Path(f).name]] for f in members}) > 1 for members in groups)
    return {
        "copies_grouped_with_original": float(np.mean(together)) if pairs else None,
        "groups": len(groups),
        "groups_mixing_photos": int(mixed),
    }


def section_dedup(args, folder: Path, made: dict, work: Path) -> dict:
    """diffmem dedup and Immaculate's dedup at the same threshold, alternating; medians, and the
    share of copies each puts in their original's group."""
    import pandas as pd

    exe = args.immaculate if args.immaculate and shutil.which(args.immaculate) else None
    n = len(made["files"])
    tools = diffmem_tools(
        args, work, "dedup", lambda out: diffmem_dedup_cmd(folder, out, args.features, args.threads, args.threshold)
    )
    if exe:
        tools["immaculate"] = lambda r: measure([exe, "--json", "--method", "sscd_distilled", str(folder / "images")])
    runs = alternate(tools, args.repeats, "dedup")
    table = pd.read_parquet(next((work / "dedup0").rglob("groups.parquet")))
    groups = [g["file"].tolist() for _, g in table.groupby("group_id") if len(g) > 1]
    result = {
        "n_images": n,
        "features": args.features,
        "threshold": args.threshold,
        "diffmem_dedup": {**medians(runs["diffmem"], n), **grouped_share(groups, made["pairs"], made["files"])},
    }
    if args.compare_src:
        result["diffmem_compare"] = {"src": args.compare_src, **medians(runs["diffmem_compare"], n)}
    if exe:
        found = json.loads(runs["immaculate"][-1]["output"][runs["immaculate"][-1]["output"].index("{") :])
        result["immaculate_dedup"] = {
            **medians(runs["immaculate"], n),
            **grouped_share(found["exact"] + found["near"], made["pairs"], made["files"]),
        }
        result["cpu_ratio"] = result["diffmem_dedup"]["cpu_s"] / result["immaculate_dedup"]["cpu_s"]
        if args.compare_src:
            result["compare_cpu_ratio"] = result["diffmem_compare"]["cpu_s"] / result["immaculate_dedup"]["cpu_s"]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "photos"
        t = time.perf_counter()
        made = make_folder(folder, args.n, args.seed)
        print(
            f"folder {folder}: {len(made['files'])} JPEGs, {len(made['pairs'])} copies "
            f"({time.perf_counter() - t:.1f} s)",
            flush=True,
        )
        result = {"folder": {"n": len(made["files"]), "copies": len(made["pairs"]), "seed": args.seed}}
        for name in args.section:
            result[name] = globals()[f"section_{name}"](args, folder, made, Path(tmp) / "work" / name)
            print(json.dumps({k: v for k, v in result[name].items() if not k.endswith("_tail")}, indent=1), flush=True)
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
