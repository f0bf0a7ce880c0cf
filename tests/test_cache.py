"""The caches: keyed by content or file version, bounded in bytes, least recently used out first."""

import os

import torch

from lib.engine.cache import BoundedCache, crop_key, file_key
from lib.model import CropEncoding


def encoding(value: float, voxels: int = 1000) -> CropEncoding:
    return CropEncoding(*(torch.full((voxels,), value) for _ in range(3)))


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
    cache = BoundedCache(2 * one, CropEncoding.nbytes.fget)
    cache.put("a", encoding(1))
    cache.put("b", encoding(2))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", encoding(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.size == 2 * one
    assert (cache.hits, cache.misses) == (3, 1)


def test_an_entry_larger_than_the_bound_is_not_kept():
    cache = BoundedCache(10, CropEncoding.nbytes.fget)
    cache.put("big", encoding(1))
    assert len(cache) == 0 and cache.size == 0


def test_a_file_rewritten_in_place_gets_a_new_key(tmp_path):
    path = tmp_path / "image.nii.gz"
    path.write_bytes(b"one")
    first = file_key(str(path), "kits")
    assert first == file_key(str(path), "kits") and first != file_key(str(path), "lits")
    path.write_bytes(b"two, longer")
    os.utime(path, ns=(1, 1))
    assert file_key(str(path), "kits") != first
