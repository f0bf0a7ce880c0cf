"""Pre-process an image once per file version and preset, however many clicks follow."""

from typing import Any, Callable, Dict, Sequence

from monai.config import KeysCollection
from monai.transforms import MapTransform

from .keys import from_cache


class CachedPreprocessd(MapTransform):
    """Run ``transforms`` on ``data[key]`` (a file path), or take their result from ``cache``.

    ``cache`` has get(key) and put(key, value); ``cache_key(path)`` names a file version. The cached image is
    shared between requests, so nothing downstream may change it in place. ``data[f"{key}_from_cache"]`` says
    whether it came from the cache (``keys.from_cache``)."""

    def __init__(self, keys: KeysCollection, transforms: Sequence[Callable], cache, cache_key: Callable[[str], str]):
        super().__init__(keys)
        self.transforms = transforms
        self.cache = cache
        self.cache_key = cache_key

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        key = self.keys[0]
        name = self.cache_key(d[key])
        image = self.cache.get(name)
        d[from_cache(key)] = image is not None
        if image is None:
            loaded = {key: d[key]}
            for transform in self.transforms:  # not Compose: it would wrap the 4xx errors that transforms raise
                loaded = transform(loaded)
            image = loaded[key]
            self.cache.put(name, image)
        d[key] = image
        return d
