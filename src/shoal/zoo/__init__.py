"""The demo zoo: a tiny base model, specialist parents fine-tuned from it, and the tasks that show merging at work."""

from shoal.zoo.build import SIZES, Zoo, build_zoo, default_zoo_dir, load_zoo
from shoal.zoo.pool import PoolZoo, build_pool, load_pool
from shoal.zoo.vlmzoo import VLM_SIZES, VlmZoo, build_vlm_zoo, load_vlm_zoo

__all__ = ["SIZES", "VLM_SIZES", "PoolZoo", "VlmZoo", "Zoo", "build_pool", "build_vlm_zoo", "build_zoo", "default_zoo_dir",
           "load_pool", "load_vlm_zoo", "load_zoo"]
