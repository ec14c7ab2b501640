"""Key/value-cache compression by head: full caches for chosen key/value groups, a sink plus a
recent window for the others, compared on NIAH at equal memory (:mod:`rh_lens.kvcache.policy`,
:func:`compute_kv_compress`); :func:`decode_kv_policy_slow` is the explicit truncated-cache
reference that the masked implementation is tested against."""

from rh_lens.kvcache.policy import (
    KVPolicy,
    cache_bytes,
    group_scores,
    kv_policies,
    matched_window,
    policy_hooks,
)
from rh_lens.kvcache.reference import decode_kv_policy_slow, kept_positions

__all__ = ["KVPolicy", "cache_bytes", "decode_kv_policy_slow", "group_scores", "kept_positions",
           "kv_policies", "matched_window", "policy_hooks"]
