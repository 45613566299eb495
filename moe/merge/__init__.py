"""Merging fine-tunes: methods registered by name (one file each), lineage and shape checks.

from moe.merge import merge, load_merge_config
merge("recipes/merge/ties.yaml", out="runs/code-merged")
"""

from moe.merge.config import MergeConfig, load_merge_config, merge_config_from_dict
from moe.merge.merge import merge
from moe.merge.registry import names as methods

__all__ = ["MergeConfig", "load_merge_config", "merge", "merge_config_from_dict", "methods"]
