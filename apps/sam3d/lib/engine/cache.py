"""Bounded, thread-safe LRU caches: crop encodings, correction rounds and pre-processed volumes (by bytes)."""

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Callable, Generic, Optional, TypeVar

import torch

Value = TypeVar("Value")


def crop_key(crop: torch.Tensor, model_version: str, preset: str) -> str:
    """Key a crop by its content: a crop of another image, an edited image or another model never matches."""
    digest = hashlib.sha256(crop.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return f"{model_version}/{preset}/{tuple(crop.shape)}/{digest}"


def file_key(path: str, preset: str) -> str:
    """Key a file by its path and version: an image rewritten in place is loaded again."""
    stat = os.stat(path)
    return f"{os.path.realpath(path)}/{stat.st_mtime_ns}/{stat.st_size}/{preset}"


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class BoundedCache(Generic[Value]):
    """Least recently used entries go first once the entries' sizes (``size_of``, e.g. bytes) exceed ``capacity``."""

    def __init__(self, capacity: int, size_of: Callable[[Value], int]) -> None:
        self.capacity = capacity
        self.size_of = size_of
        self._entries: "OrderedDict[str, Value]" = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[Value]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, value: Value) -> None:
        size = self.size_of(value)
        if size > self.capacity:
            return
        with self._lock:
            if key in self._entries:
                self._size -= self.size_of(self._entries.pop(key))
            self._entries[key] = value
            self._size += size
            while self._size > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self._size -= self.size_of(evicted)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)


class CropRounds:
    """The answers of one crop encoding already computed, by their clicks (``Sam3DPredictor.correction_logits``'s memo:
    correction rounds, or the rule's one-object answers), kept in a cache shared by all crops. A pure memo: a
    request's answer never depends on what is in it."""

    def __init__(self, cache: BoundedCache, crop: str) -> None:
        self.cache = cache
        self.crop = crop

    def key(self, points: torch.Tensor, labels: torch.Tensor) -> str:
        return f"{self.crop}/{points.tolist()}/{labels.tolist()}"

    def get(self, points: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
        return self.cache.get(self.key(points, labels))

    def put(self, points: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        self.cache.put(self.key(points, labels), logits)
