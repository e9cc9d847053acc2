"""The stage-1 vector cache format (SPEC §3), the one owner of it: files, identity and meta, the writer lock, shard
files, the key lookup, and the reader and writer (:mod:`pipeline.cache.store`).

The names most code needs are re-exported here: ``from pipeline.cache import CacheReader``.
"""

from pipeline.cache.meta import (
    FORMAT_VERSION,
    IDENTITY_KEYS,
    NORM_TOLERANCE,
    CacheError,
    CacheIdentity,
    CacheIdentityError,
    CacheLayout,
    CacheMeta,
)
from pipeline.cache.store import CacheReader, CacheWriter

__all__ = ["FORMAT_VERSION", "IDENTITY_KEYS", "NORM_TOLERANCE", "CacheError", "CacheIdentity", "CacheIdentityError",
           "CacheLayout", "CacheMeta", "CacheReader", "CacheWriter"]
