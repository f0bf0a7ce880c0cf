"""The feature cache: keyed by content, bounded in bytes, least recently used out first."""

import torch

from lib.infers.feature_cache import FeatureCache, crop_key
from lib.model import CropEncoding


def encoding(value: float, voxels: int = 1000) -> CropEncoding:
    return CropEncoding(torch.full((voxels,), value), torch.full((voxels,), value))


def test_keys_depend_on_content_model_and_preset():
    crop = torch.randn(8, 8, 8)
    key = crop_key(crop, "model-a", "kits")
    assert key == crop_key(crop.clone(), "model-a", "kits")
    edited = crop.clone()
    edited[3, 3, 3] += 1
    assert len({key, crop_key(edited, "model-a", "kits"), crop_key(crop, "model-b", "kits"),
                crop_key(crop, "model-a", "lits")}) == 4


def test_the_cache_stays_under_its_byte_bound_and_evicts_the_least_recently_used():
    one = encoding(0).nbytes
    cache = FeatureCache(max_bytes=2 * one)
    cache.put("a", encoding(1))
    cache.put("b", encoding(2))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", encoding(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.nbytes == 2 * one
    assert (cache.hits, cache.misses) == (3, 1)


def test_an_entry_larger_than_the_bound_is_not_kept():
    cache = FeatureCache(max_bytes=10)
    cache.put("big", encoding(1))
    assert len(cache) == 0 and cache.nbytes == 0
