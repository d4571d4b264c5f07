"""Proxy negatives for the difficulty-adaptive perceptual loss (docs/negatives.md).

- ``ProxyNegatives``: run frozen proxy restorers online, only on the samples each one covers.
- ``RenderCache``: render proxies once over a data set to disk (tiled, resumable, with input fingerprints)
  and read the negatives back aligned with each training crop (``CropFlip``); ``verify`` checks a data set
  against it.
- ``merge_negatives`` / ``no_negatives``: the ``(negatives (B, K, 3, h, w), mask (B, K))`` pair of a batch.
"""
from ..data.crops import CropFlip
from .batch import merge_negatives, no_negatives
from .cache import RenderCache
from .fingerprints import image_fingerprint, model_fingerprint
from .items import CacheItem, items_from_folder, items_from_manifest, items_from_task_folders, task_folder_key
from .proxies import ProxyNegatives

__all__ = ["CacheItem", "CropFlip", "ProxyNegatives", "RenderCache", "image_fingerprint", "items_from_folder",
           "items_from_manifest", "items_from_task_folders", "merge_negatives", "model_fingerprint", "no_negatives",
           "task_folder_key"]
