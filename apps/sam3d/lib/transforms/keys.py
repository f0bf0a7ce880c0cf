"""Keys of the data dict that cross modules: the infer task, the pre-processing transforms and the resampling
back to the image's grid read and write them."""

IMAGE = "image"  # the image: a file path, then the pre-processed (1, D, H, W) MetaTensor on the model's grid
CLICKS = "clicks"  # {"foreground": (N, 3), "background": (M, 3)} voxel indices, of the image, then of the model grid
BOX = "prompt_box"  # the request's box (``Box``) or None, of the image, then of the model grid
PRED = "pred"  # the foreground probability (1, D, H, W) on the model's grid, then the uint8 mask on the image's
# [(start, size)]: the cubes of the model's grid outside which the prediction is zero (only they are resampled back)
CROP_BOXES = "crop_boxes"


def from_cache(key: str) -> str:
    """Whether ``key``'s pre-processed value came from the cache (``CachedPreprocessd``)."""
    return f"{key}_from_cache"
