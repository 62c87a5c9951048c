"""FAISS indexes for retrieval against a training set (see ``faiss_index``)."""

from diffmem.index.faiss_index import (
    INDEX_FILE,
    INFO_FILE,
    add_shard,
    build_index,
    check_features,
    load_index,
    measure_recall,
    merge_shards,
    recall_at_k,
    save_index,
    search,
    set_search_params,
    streaming_search,
    train_empty_index,
)

__all__ = [
    "INDEX_FILE", "INFO_FILE", "add_shard", "build_index", "check_features", "load_index",
    "measure_recall", "merge_shards", "recall_at_k", "save_index", "search",
    "set_search_params", "streaming_search", "train_empty_index",
]
