"""Reference tests for diffmem.metrics: hand-computed cases and brute-force cross-checks."""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy.sparse.csgraph import connected_components

from diffmem.errors import ConfigError, DataError
from diffmem.metrics import (
    METRICS,
    carlini_extraction,
    dcr_summary,
    extraction_from_distances,
    fixed_pixel_mask,
    grouped,
    mean_max,
    median_mad,
    memorisation_rate,
    replication_rate,
    resize_images,
    sscd_score_normalisation,
    tile_l2_distance,
    tile_l2_matrix,
    top1_similarity,
    vm_tm_split,
    webster_label,
    webster_scores,
    webster_sse,
)
from diffmem.metrics.replication import DCRSummary, Metric

NAN = float("nan")


# --- similarity scores -------------------------------------------------------------------


def test_top1_similarity_hand_case_and_topk_input():
    assert top1_similarity([[0.2, 0.9], [0.5, 0.1]]).tolist() == [0.9, 0.5]
    sim = np.random.default_rng(0).uniform(-1, 1, (5, 40))
    topk = -np.sort(-sim, axis=1)[:, :3]
    np.testing.assert_array_equal(top1_similarity(topk), top1_similarity(sim))
    np.testing.assert_array_equal(top1_similarity(sim), [max(row) for row in sim])


def test_dcr_summary_hand_case():
    out = dcr_summary([0.1, 0.4, 0.6, 0.8])
    assert out["threshold"] == 0.5 and out["n"] == 4
    assert out["mean"] == pytest.approx(0.475)
    assert out["p95"] == pytest.approx(0.77)  # position 0.95 * 3 = 2.85: 0.6 + 0.85 * 0.2
    assert out["share_above"] == 0.5
    assert dcr_summary([0.5, 0.5, 0.51])["share_above"] == pytest.approx(1 / 3)  # strictly above


def test_dcr_summary_matches_numpy_and_baseline_differences():
    rng = np.random.default_rng(1)
    gen, real = rng.beta(2, 3, 501), rng.beta(2, 5, 300)
    out = dcr_summary(gen, threshold=0.6, baseline_top1=real, q=90)
    assert out["threshold"] == 0.6
    assert out["p90"] == pytest.approx(np.percentile(gen, 90))
    assert out["baseline_p90"] == pytest.approx(np.percentile(real, 90))
    assert out["share_above"] == pytest.approx(np.mean(gen > 0.6))
    assert out["baseline_mean"] == pytest.approx(real.mean())
    assert out["baseline_n"] == 300
    for key in ("mean", "p90", "share_above"):
        assert out[f"diff_{key}"] == pytest.approx(out[key] - out[f"baseline_{key}"])
    assert "diff_n" not in out


def test_replication_rate_is_strictly_above_threshold():
    assert replication_rate([0.7, 0.71, 0.2, 0.9]) == 0.5
    assert replication_rate([[0.4, 0.6], [0.1, 0.2]], threshold=0.5) == 0.25


SCORES = {"a": [0.1, 0.8], "b": [0.2, 0.3], "c": [0.9, 0.95, 0.1]}


def test_memorisation_rate_reductions_and_mask():
    assert memorisation_rate(SCORES) == pytest.approx(2 / 3)
    assert memorisation_rate(SCORES, reduction="mean") == pytest.approx((1 / 2 + 0 + 2 / 3) / 3)
    mask = {"a": True, "b": True, "c": False}
    assert memorisation_rate(SCORES, memorised_mask=mask) == pytest.approx(1 / 2)
    assert memorisation_rate(SCORES, memorised_mask=pd.Series(mask)) == pytest.approx(1 / 2)
    assert memorisation_rate(SCORES, threshold=0.85) == pytest.approx(1 / 3)


def test_memorisation_rate_accepts_long_dataframe():
    df = pd.DataFrame([(p, s) for p, ss in SCORES.items() for s in ss], columns=["prompt_id", "score"])
    assert memorisation_rate(df) == memorisation_rate(SCORES)
    assert memorisation_rate(df.rename(columns={"score": "sscd"}), score_col="sscd", reduction="mean") == (
        memorisation_rate(SCORES, reduction="mean")
    )


def test_vm_tm_split():
    assert vm_tm_split([0.7, 0.71, 0.3]).tolist() == ["TM", "VM", "TM"]
    assert vm_tm_split([0.55], threshold=0.5).tolist() == ["VM"]


def test_sscd_score_normalisation_hand_case():
    background = [[0.1, 0.3, 0.2], [0.0, 0.4, 0.8]]  # unsorted: k=2 uses the two largest
    out = sscd_score_normalisation([[0.9, 0.5], [0.7, 0.6]], background, k=2)
    np.testing.assert_allclose(out, [[0.65, 0.25], [0.1, 0.0]], atol=1e-12)
    out = sscd_score_normalisation([0.9, 0.7], background, beta=0.5, k=3)
    np.testing.assert_allclose(out, [0.9 - 0.1, 0.7 - 0.2])


# --- aggregation -------------------------------------------------------------------------


def test_median_mad_and_mean_max():
    assert median_mad([1, 2, 3, 4, 100]) == {"median": 3.0, "mad": 1.0}
    assert median_mad([1, 2, 3, 4]) == {"median": 2.5, "mad": 1.0}
    assert mean_max([1, 2, 3, 10]) == {"mean": 4.0, "max": 10.0}


def test_grouped_aggregation():
    df = pd.DataFrame({"type": ["VM", "TM", "VM", "TM", "VM"], "sscd": [0.9, 0.3, 0.8, 0.5, 0.1]})
    out = grouped(df, "sscd", by="type")
    assert out.index.name == "type" and list(out.index) == ["TM", "VM"]
    assert out.loc["VM", "median"] == pytest.approx(0.8) and out.loc["VM", "mad"] == pytest.approx(0.1)
    assert out.loc["TM", "median"] == pytest.approx(0.4) and out.loc["TM", "n"] == 2
    out = grouped(df, "sscd", by="type", fn=mean_max)
    assert out.loc["VM", "mean"] == pytest.approx(0.6) and out.loc["TM", "max"] == pytest.approx(0.5)
    df.loc[1, "sscd"] = NAN
    with pytest.raises(DataError, match=r"sscd.*type='TM'.*non-finite"):
        grouped(df, "sscd", by="type")


# --- Carlini tiled distance and extraction --------------------------------------------------


def _brute_tile_l2(a, b, grid):
    """Max over tiles of the RMS difference, tiles cut by explicit index arithmetic."""

    def bounds(n):
        sizes = [n // grid + (i < n % grid) for i in range(grid)]
        starts = np.cumsum([0] + sizes)
        return list(zip(starts[:-1], starts[1:]))

    worst = 0.0
    for r0, r1 in bounds(a.shape[0]):
        for c0, c1 in bounds(a.shape[1]):
            d = a[r0:r1, c0:c1] - b[r0:r1, c0:c1]
            worst = max(worst, np.linalg.norm(d) / np.sqrt(d.size))
    return worst


def test_tile_l2_hand_case_is_max_over_tiles():
    a, b = np.zeros((8, 8, 3)), np.zeros((8, 8, 3))
    b[:2, :2] = 0.5  # one 2x2 tile of the 4x4 grid differs by 0.5 everywhere
    assert tile_l2_distance(a, b) == pytest.approx(0.5)  # whole-image RMS would be 0.125
    assert tile_l2_distance(a, b, grid=1) == pytest.approx(0.125)


@pytest.mark.parametrize("shape,grid", [((16, 16, 3), 4), ((10, 9, 3), 4), ((7, 13, 1), 3)])
def test_tile_l2_matches_brute_force(shape, grid):
    rng = np.random.default_rng(2)
    a, b = rng.random((3,) + shape), rng.random((3,) + shape)
    expected = [_brute_tile_l2(x, y, grid) for x, y in zip(a, b)]
    np.testing.assert_allclose(tile_l2_distance(a, b, grid=grid), expected)
    assert tile_l2_distance(a[0], b[0], grid=grid) == pytest.approx(expected[0])
    np.testing.assert_allclose(tile_l2_distance(a[0], b, grid=grid), [_brute_tile_l2(a[0], y, grid) for y in b])
    mat = tile_l2_matrix(a, b, grid=grid)
    np.testing.assert_allclose(mat, [[_brute_tile_l2(x, y, grid) for y in b] for x in a], atol=1e-9)
    self_mat = tile_l2_matrix(a, grid=grid)
    np.testing.assert_allclose(self_mat, self_mat.T)
    assert np.all(np.diag(self_mat) == 0)


def _random_distances(rng, n, p_edge):
    d = rng.random((n, n))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    return d, np.quantile(d[np.triu_indices(n, 1)], p_edge)


def _brute_max_clique(adj):
    n = len(adj)
    for size in range(n, 0, -1):
        for nodes in itertools.combinations(range(n), size):
            if all(adj[i, j] for i, j in itertools.combinations(nodes, 2)):
                return size
    return 0


def test_max_clique_matches_brute_force():
    rng = np.random.default_rng(3)
    for trial in range(30):
        dist, threshold = _random_distances(rng, 9, p_edge=[0.3, 0.5, 0.8][trial % 3])
        adj = dist < threshold
        size = _brute_max_clique(adj)
        out = extraction_from_distances(dist, threshold, min_clique=size)
        assert out["size"] == size and out["extracted"] and out["method"] == "clique"
        assert all(adj[i, j] for i, j in itertools.combinations(out["members"], 2))
        assert not extraction_from_distances(dist, threshold, min_clique=size + 1)["extracted"]


def test_components_match_scipy():
    rng = np.random.default_rng(4)
    for trial in range(20):
        dist, threshold = _random_distances(rng, 30, p_edge=0.02 + 0.01 * trial)
        _, labels = connected_components(dist < threshold, directed=False)
        largest = np.bincount(labels).max()
        out = extraction_from_distances(dist, threshold, method="components", min_component=largest)
        assert out["size"] == largest and out["extracted"]
        assert len(set(labels[out["members"]])) == 1
        assert not extraction_from_distances(dist, threshold, method="components", min_component=largest + 1)[
            "extracted"
        ]


def test_carlini_extraction_on_near_copies():
    rng = np.random.default_rng(5)
    base = rng.random((16, 16, 3))
    copies = np.clip(base + rng.normal(0, 0.01, (10, 16, 16, 3)), 0, 1)
    gens = np.concatenate([copies, rng.random((2, 16, 16, 3))])
    out = carlini_extraction(gens, threshold=0.1)
    assert out["extracted"] and out["size"] == 10 and out["members"] == list(range(10))
    assert out["threshold"] == 0.1 and out["min_size"] == 10
    assert not carlini_extraction(gens, threshold=0.1, min_clique=11)["extracted"]
    comp = carlini_extraction(gens, threshold=0.1, method="components", min_component=3)
    assert comp["extracted"] and comp["size"] == 10
    assert not carlini_extraction(gens, threshold=0.01)["extracted"]


# --- Webster ------------------------------------------------------------------------------


def test_webster_sse_hand_case():
    a, b = np.zeros((2, 2, 3)), np.full((2, 2, 3), 0.5)
    assert webster_sse(a, b) == pytest.approx(12 * 0.25)
    assert webster_sse(a, b, mask=[[True, False], [False, False]]) == pytest.approx(3 * 0.25)
    np.testing.assert_allclose(webster_sse(np.stack([a, b]), b), [3.0, 0.0])


def test_resize_images():
    out = resize_images(np.full((2, 512, 384, 3), 0.3, dtype=np.float32))
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, rtol=1e-6)


def test_fixed_pixel_mask_synthetic():
    rng = np.random.default_rng(6)
    gens = rng.random((5, 32, 32, 3))
    gens[:, 5:15, 8:20] = 0.9 * gens[0, 5:15, 8:20] + rng.uniform(0, 0.02, (5, 10, 12, 3))  # varies < tol
    gens[:, 28, 28] = 0.4  # one isolated fixed pixel: removed by the erosion
    gens[:, 20:26, 2:10, 0] = 0.7  # fixed in one channel only: not fixed
    expected = np.zeros((32, 32), bool)
    expected[5:15, 8:20] = True
    np.testing.assert_array_equal(fixed_pixel_mask(gens), expected)
    raw = fixed_pixel_mask(gens, erosion_iterations=0, dilation_iterations=0)
    assert raw[28, 28] and raw[expected].all()
    assert not fixed_pixel_mask(gens, tol=0.01)[expected].all()  # tighter than the planted variation


@pytest.fixture(scope="module")
def webster_case():
    rng = np.random.default_rng(7)
    return rng, rng.random((256, 256, 3)), rng.random((4, 256, 256, 3))


def test_webster_label_matching_verbatim(webster_case):
    rng, real, gens = webster_case
    gens = gens.copy()
    gens[2] = np.clip(real + rng.normal(0, 0.01, real.shape), 0, 1)
    assert webster_label(gens, real) == "MV"
    assert webster_label(np.stack([real, real]), real) == "MV"  # TV also holds: MV wins


def test_webster_label_template_verbatim(webster_case):
    _, real, gens = webster_case
    gens = gens.copy()
    gens[:, :128] = real[:128]  # fixed template (top half) copied from the real image
    scores = webster_scores(gens, real)
    assert scores["mv_sse"] > 2.5e3 and scores["tv_sse"] == 0.0
    assert scores["mask_fraction"] == pytest.approx(0.5, abs=1e-3)
    assert webster_label(gens, real) == "TV"
    assert webster_label(gens, real, retrieved=gens[0]) == "TV"  # RV also holds: TV wins
    assert webster_label(gens, real, tv_threshold=0.0) == "N"


def test_webster_label_retrieved_verbatim_and_none(webster_case):
    rng, real, gens = webster_case
    near = np.clip(gens[1] + rng.normal(0, 0.01, real.shape), 0, 1)
    other = rng.random(real.shape)
    assert webster_scores(gens, real)["tv_sse"] == np.inf  # nothing fixed across generations
    assert webster_label(gens, real, retrieved=np.stack([other, near])) == "RV"
    assert webster_label(gens, real, retrieved=near, rv_threshold=1.0) == "N"
    assert webster_label(gens, real, retrieved=other) == "N"
    assert webster_label(gens, real) == "N"


# --- classes, registry, input errors ----------------------------------------------------------


def test_metric_classes_and_registry():
    x = [0.2, 0.55, 0.9]
    assert DCRSummary(threshold=0.6)(x) == dcr_summary(x, threshold=0.6)
    assert DCRSummary(threshold=0.6).compute(x, threshold=0.1)["share_above"] == 1.0
    assert METRICS.build("dcr", threshold=0.6)(x) == dcr_summary(x, threshold=0.6)
    for name in METRICS.names():
        cls = METRICS.get(name)
        assert issubclass(cls, Metric) and cls.name == name
        assert cls.higher_is_better in (True, False, None)
    assert METRICS.get("replication_rate").higher_is_better is False
    with pytest.raises(ConfigError, match="thresold"):
        DCRSummary(thresold=0.6)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    sim = torch.tensor([[0.2, 0.9], [0.5, 0.1]], requires_grad=True)
    assert top1_similarity(sim).tolist() == pytest.approx([0.9, 0.5])


IMG = np.full((8, 8, 3), 0.5)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: top1_similarity([0.1, 0.2]), r"scores: expected a 2-D"),
        (lambda: dcr_summary([0.1, NAN]), r"top1: 1 non-finite"),
        (lambda: dcr_summary([]), r"top1: empty"),
        (lambda: dcr_summary([0.1], baseline_top1=[np.inf]), r"baseline_top1: 1 non-finite"),
        (lambda: replication_rate(["x"]), r"scores: not a numeric"),
        (lambda: memorisation_rate({}), r"per_prompt_scores"),
        (lambda: memorisation_rate({"a": []}), r"per_prompt_scores\['a'\]: empty"),
        (lambda: memorisation_rate(SCORES, memorised_mask={"a": True}), r"memorised_mask: no entry"),
        (
            lambda: memorisation_rate(SCORES, memorised_mask={"a": 1, "b": 0, "c": 0, "z": 1}),
            r"memorised_mask: memorised prompt\(s\) without scores",
        ),
        (lambda: memorisation_rate(pd.DataFrame({"p": [1]})), r"per_prompt_scores: no column"),
        (lambda: vm_tm_split([[0.1]]), r"max_scores: expected a 1-D"),
        (lambda: sscd_score_normalisation([[0.9]], [[0.1, 0.2]], k=3), r"background_scores: 2 neighbours"),
        (lambda: sscd_score_normalisation([[0.9], [0.8]], np.ones((3, 10))), r"background_scores: 3 queries"),
        (lambda: median_mad([]), r"x: empty"),
        (lambda: mean_max([1.0, NAN]), r"x: 1 non-finite"),
        (lambda: grouped(pd.DataFrame({"a": [1]}), "a", by="g"), r"df: no column\(s\) 'g'"),
        (lambda: tile_l2_distance(IMG, np.full((8, 6, 3), 0.5)), r"b: image shape"),
        (lambda: tile_l2_distance(np.stack([IMG] * 2), np.stack([IMG] * 3)), r"b: 3 images, a has 2"),
        (lambda: tile_l2_distance((IMG * 255).astype(np.uint8), IMG), r"a: expected float images"),
        (lambda: tile_l2_distance(IMG * 3, IMG), r"a: values must lie in \[0, 1\]"),
        (lambda: tile_l2_distance(IMG[..., 0], IMG), r"a: expected a 3-D or 4-D"),
        (lambda: tile_l2_distance(IMG[:3], IMG[:3]), r"a: \(3, 8\) pixels cannot be split"),
        (lambda: tile_l2_matrix(IMG), r"a: expected a 4-D"),
        (lambda: extraction_from_distances(np.ones((2, 3)), 0.1), r"distances: expected a symmetric square"),
        (lambda: extraction_from_distances([[0, 1], [2, 0]], 0.1), r"distances: expected a symmetric square"),
        (lambda: carlini_extraction(IMG, 0.1), r"gen_images: expected a 4-D"),
        (lambda: webster_sse(IMG, IMG, mask=np.ones((4, 4))), r"mask: shape \(4, 4\)"),
        (lambda: webster_label(np.stack([IMG] * 2), np.full((8, 7, 3), 0.5)), r"real: image shape"),
        (lambda: webster_label(np.stack([IMG] * 2), IMG, retrieved=np.zeros((4, 4, 3))), r"retrieved: image"),
        (lambda: fixed_pixel_mask(IMG), r"generations: expected a 4-D"),
    ],
)
def test_bad_input_raises_data_error_naming_the_argument(call, match):
    with pytest.raises(DataError, match=match):
        call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: memorisation_rate(SCORES, reduction="max"), r"reduction must be one of any, mean \(got 'max'\)"),
        (
            lambda: extraction_from_distances(np.zeros((2, 2)), 0.1, method="cliques"),
            r"method must be one of clique, components \(got 'cliques'\) \(did you mean 'clique'\?\)",
        ),
        (lambda: tile_l2_distance(IMG, IMG, grid=0), r"grid must be >= 1"),
        (lambda: fixed_pixel_mask(np.stack([IMG] * 2), erosion_iterations=-1), r"erosion_iterations"),
        (lambda: sscd_score_normalisation([0.9], [[0.1]], k=0), r"k must be >= 1"),
    ],
)
def test_bad_settings_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
