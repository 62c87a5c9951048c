"""FAISS indexes for retrieval against a training set, one concern per module:
:mod:`~diffmem.index.build` (checks, factory, training, building), :mod:`~diffmem.index.sharded`
(train empty, add shards, merge in memory or on disk), :mod:`~diffmem.index.files`
(``index.faiss`` + ``index_info.json``), :mod:`~diffmem.index.search` (batched and streaming
top-k), :mod:`~diffmem.index.recall`; :mod:`~diffmem.index.matches` writes what a search finds."""

from diffmem.index.build import build_index, check_features, set_search_params, set_threads, training_rows
from diffmem.index.files import INDEX_FILE, INFO_FILE, load_index, save_index, write_index
from diffmem.index.recall import measure_recall, recall_at_k
from diffmem.index.search import search, streaming_search
from diffmem.index.sharded import add_shard, merge_shards, train_empty_index

__all__ = [
    "INDEX_FILE",
    "INFO_FILE",
    "add_shard",
    "build_index",
    "check_features",
    "load_index",
    "measure_recall",
    "merge_shards",
    "recall_at_k",
    "save_index",
    "search",
    "set_search_params",
    "set_threads",
    "streaming_search",
    "train_empty_index",
    "training_rows",
    "write_index",
]
