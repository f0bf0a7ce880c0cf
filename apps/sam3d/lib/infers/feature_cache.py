"""A bounded, thread-safe LRU cache of crop encodings, evicting by bytes."""

import hashlib
import threading
from collections import OrderedDict
from typing import Optional

import torch

from lib.model import CropEncoding


def crop_key(crop: torch.Tensor, model_version: str, preset: str) -> str:
    """Key a crop by its content: a crop of another image, an edited image or another model never matches."""
    digest = hashlib.sha256(crop.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return f"{model_version}/{preset}/{tuple(crop.shape)}/{digest}"


class FeatureCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[str, CropEncoding]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[CropEncoding]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, encoding: CropEncoding) -> None:
        size = encoding.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
            self._entries[key] = encoding
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
