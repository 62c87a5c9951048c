"""Datasets (folder + manifest, testbed) and prompt lists."""

from diffmem.data.datasets import load_dataset, load_image, load_images, load_unit_images, select_subset, to_tensor
from diffmem.data.prompts import load_prompts, read_prompt_file

__all__ = [
    "load_dataset",
    "load_image",
    "load_images",
    "load_unit_images",
    "select_subset",
    "to_tensor",
    "load_prompts",
    "read_prompt_file",
]
