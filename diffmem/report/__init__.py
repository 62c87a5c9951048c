"""The audit report: a self-contained HTML page plus its figures as standalone PNGs."""

from diffmem.report.figures import (
    GridPair,
    detection_by_dup_count,
    dup_count_table,
    image_grid,
    similarity_histogram,
)
from diffmem.report.html import write_detect_report, write_report

__all__ = [
    "GridPair",
    "detection_by_dup_count",
    "dup_count_table",
    "image_grid",
    "similarity_histogram",
    "write_detect_report",
    "write_report",
]
