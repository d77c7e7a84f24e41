"""KV-cache storage and policies. Importing this package registers every cache policy in it."""

from workbench.cache import (  # noqa: F401  (registration)
    block_fp,
    cachegen,
    dense,
    double_sparsity,
    ems,
    gear,
    h2o,
    kivi,
    lserve,
    mustafar,
    prefix_kv,
    shadowkv,
    snapkv,
    streaming,
)
from workbench.cache.base import CachePolicy, KVCache, LayerCache

__all__ = ["CachePolicy", "KVCache", "LayerCache"]
