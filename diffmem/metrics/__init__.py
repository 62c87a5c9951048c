"""Replication (copy) metrics: similarity scores, pixel-space tests, aggregation (methods.md section 1);
utility metrics (Fréchet distance, diversity, CLIPScore) for judging mitigations (section 5).

Each metric is a plain function and a :class:`~diffmem.metrics.replication.Metric` class
registered in ``REG`` by name: ``REG.build("dcr", threshold=0.5)(top1)``.
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

REG = Registry("metric")
REG.register("top1_similarity", "diffmem.metrics.replication:Top1Similarity")
REG.register("dcr", "diffmem.metrics.replication:DCRSummary")
REG.register("replication_rate", "diffmem.metrics.replication:ReplicationRate")
REG.register("memorisation_rate", "diffmem.metrics.replication:MemorisationRate")
REG.register("vm_tm", "diffmem.metrics.replication:VMTMSplit")
REG.register("sscd_normalisation", "diffmem.metrics.replication:SSCDScoreNormalisation")
REG.register("tile_l2", "diffmem.metrics.pixel:TileL2Distance")
REG.register("carlini_extraction", "diffmem.metrics.pixel:CarliniExtraction")
REG.register("webster_sse", "diffmem.metrics.pixel:WebsterSSE")
REG.register("webster_label", "diffmem.metrics.pixel:WebsterLabel")
REG.register("median_mad", "diffmem.metrics.aggregate:MedianMAD")
REG.register("mean_max", "diffmem.metrics.aggregate:MeanMax")
REG.register("frechet_distance", "diffmem.metrics.utility:FrechetDistance")
REG.register("diversity", "diffmem.metrics.utility:Diversity")
REG.register("clip_score", "diffmem.metrics.utility:ClipScore")

__all__ = [
    "REG",
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
