"""KV-cache storage and policies. Importing this package registers every cache policy in it."""

from workbench.cache import dense  # noqa: F401  (registration)
from workbench.cache.base import CachePolicy, KVCache, LayerCache

__all__ = ["CachePolicy", "KVCache", "LayerCache"]
