"""The demo zoo: a tiny base model, specialist parents fine-tuned from it, and the tasks that show merging at work."""

from shoal.zoo.build import SIZES, Zoo, build_zoo, default_zoo_dir, load_zoo

__all__ = ["SIZES", "Zoo", "build_zoo", "default_zoo_dir", "load_zoo"]
