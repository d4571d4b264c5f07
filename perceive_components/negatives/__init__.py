"""Proxy negatives for the difficulty-adaptive perceptual loss (SPEC.md §2.2, DESIGN.md §5).

- ``ProxyNegatives``: run frozen proxy restorers online, only on the samples each one covers.
- ``RenderCache``: render proxies once over a data set to disk (tiled, resumable) and read the
  negatives back aligned with each training crop (``CropFlip``).
"""
from ..data.crops import CropFlip
from .cache import CacheItem, RenderCache, items_from_folder, items_from_manifest
from .proxies import ProxyNegatives

__all__ = ["CacheItem", "CropFlip", "ProxyNegatives", "RenderCache", "items_from_folder", "items_from_manifest"]
