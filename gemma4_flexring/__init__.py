"""gemma4-flexring: exact context-parallel ring attention for Gemma 4 masks."""

from . import presets
from .ahead import plan_ahead
from .api import ring_attention
from .info import SequenceInfo
from .layout import Layout
from .planning.cache import clear_mask_cache, mask_cache_info, set_mask_cache_capacity
from .planning.flexmask import FlexMask
from .planning.masks import MaskSpec
from .stats import RingStats, reset_ring_stats, ring_stats

__all__ = ["MaskSpec", "FlexMask", "presets", "SequenceInfo", "Layout", "ring_attention", "plan_ahead", "mask_cache_info", "clear_mask_cache",
           "set_mask_cache_capacity",
           "RingStats", "ring_stats", "reset_ring_stats"]
