"""Replication (copy) metrics: similarity scores, pixel-space tests, aggregation (docs/methods.md section 1);
utility metrics (Fréchet distance, diversity, CLIPScore) for judging mitigations (section 5.5).

Each metric is a plain function; the replication, aggregation and utility ones also have a
:class:`~diffmem.metrics.replication.Metric` class registered in ``METRICS`` by name:
``METRICS.build("dcr", threshold=0.5)(top1)``.
"""

from diffmem.metrics.aggregate import grouped, mean_max, median_mad
from diffmem.metrics.pixel import (
    carlini_extraction,
    extraction_from_distances,
    fixed_pixel_mask,
    resize_images,
    tile_l2_distance,
    tile_l2_matrix,
    webster_label,
    webster_scores,
    webster_sse,
)
from diffmem.metrics.replication import (
    Metric,
    dcr_summary,
    memorisation_rate,
    replication_rate,
    sscd_score_normalisation,
    top1_similarity,
    vm_tm_split,
)
from diffmem.metrics.utility import clip_score, diversity, frechet_distance
from diffmem.registry import Registry

METRICS = Registry("metric", expects=Metric)
METRICS.register("top1_similarity", "diffmem.metrics.replication:Top1Similarity")
METRICS.register("dcr", "diffmem.metrics.replication:DCRSummary")
METRICS.register("replication_rate", "diffmem.metrics.replication:ReplicationRate")
METRICS.register("memorisation_rate", "diffmem.metrics.replication:MemorisationRate")
METRICS.register("vm_tm", "diffmem.metrics.replication:VMTMSplit")
METRICS.register("sscd_normalisation", "diffmem.metrics.replication:SSCDScoreNormalisation")
METRICS.register("median_mad", "diffmem.metrics.aggregate:MedianMAD")
METRICS.register("mean_max", "diffmem.metrics.aggregate:MeanMax")
METRICS.register("frechet_distance", "diffmem.metrics.utility:FrechetDistance")
METRICS.register("diversity", "diffmem.metrics.utility:Diversity")
METRICS.register("clip_score", "diffmem.metrics.utility:ClipScore")

__all__ = [
    "METRICS",
    "Metric",
    "top1_similarity",
    "dcr_summary",
    "replication_rate",
    "memorisation_rate",
    "vm_tm_split",
    "sscd_score_normalisation",
    "tile_l2_distance",
    "tile_l2_matrix",
    "extraction_from_distances",
    "carlini_extraction",
    "resize_images",
    "webster_sse",
    "fixed_pixel_mask",
    "webster_scores",
    "webster_label",
    "median_mad",
    "mean_max",
    "grouped",
    "frechet_distance",
    "diversity",
    "clip_score",
]
