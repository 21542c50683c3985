"""Datasets, transforms, backdoor datasets and BackdoorBench attack/defense records."""

from .backdoor import BackdoorDataset, TransformDataset
from .datasets import DATASETS, DatasetInfo, build_clean_datasets, get_dataset_info, resolve_dataset_dir
from .records import (
    find_backdoorbench_root,
    load_attack_result,
    save_attack_result,
    save_defense_result,
    summarize_metrics,
    write_metrics_csv,
    write_metrics_summary_csv,
)
from .transforms import get_normalization, get_transform

__all__ = [
    "BackdoorDataset",
    "TransformDataset",
    "DATASETS",
    "DatasetInfo",
    "build_clean_datasets",
    "get_dataset_info",
    "resolve_dataset_dir",
    "find_backdoorbench_root",
    "load_attack_result",
    "save_attack_result",
    "save_defense_result",
    "summarize_metrics",
    "write_metrics_csv",
    "write_metrics_summary_csv",
    "get_normalization",
    "get_transform",
]
