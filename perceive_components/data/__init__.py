"""Data helpers for any restoration data set (docs/data.md).

- ``paired_crops``: paired crop + CFE positive view + the ``CropFlip`` geometry to read aligned negatives with.
- ``CropFlip``: that geometry as a value; ``from_dihedral_mode`` / ``from_basicsr`` / ``centre_crop_to_multiple``
  map the field's augmentation conventions onto it; small images are resized (the authors' rule) or padded.
- ``TaskVocabulary``: one task naming shared by the contrastive loss, the online proxies and the render cache.
- ``TaskMixingBatchSampler``: batches that always hold several tasks (the contrastive term needs them).
- ``scan_images``: every image checked before a run, bad files listed at once.
- ``write_noisy_test_sets``: the paper's noisy CBSD68 inputs, bit for bit as the authors make them.
- ``AllInOneTrainSet`` and friends: the standard 3-task / 5-task layouts (``layouts``: ``LAYOUTS``, ``NOISE_SIGMAS``;
  ``find_pairs`` and ``TASK_FOLDERS`` pair the files); ``add_gaussian_noise``, ``add_haze``, ``add_rain``,
  ``degrade``: the synthetic degradations.
"""
from .crops import CropFlip, centre_crop_to_multiple, crop_flip
from .degradations import add_gaussian_noise, add_haze, add_rain, degrade
from .fitting import PADDINGS, SMALL_IMAGE_RULES, fit_image, fit_size, pad_to, resize_bicubic_8bit
from .layouts import LAYOUTS, NOISE_SIGMAS, AllInOneTrainSet, PairedTestSet, standard_test_sets
from .noisy_test_sets import noisy_test_images, write_noisy_test_sets
from .paired import PairedCrops, draw_crop, paired_crops
from .pairing import TASK_FOLDERS, LayoutError, find_pairs
from .scan import ImageScanError, ScanResult, scan_images
from .task_batches import TaskMixingBatchSampler
from .tasks import PROMPTIR_DE_IDS, STANDARD_TASKS, TaskVocabulary

__all__ = [
    "LAYOUTS", "NOISE_SIGMAS", "PADDINGS", "PROMPTIR_DE_IDS", "SMALL_IMAGE_RULES", "STANDARD_TASKS", "TASK_FOLDERS",
    "AllInOneTrainSet", "CropFlip", "ImageScanError", "LayoutError", "PairedCrops", "PairedTestSet", "ScanResult",
    "TaskMixingBatchSampler", "TaskVocabulary", "add_gaussian_noise", "add_haze", "add_rain", "centre_crop_to_multiple",
    "crop_flip", "degrade", "draw_crop", "find_pairs", "fit_image", "fit_size", "noisy_test_images", "pad_to",
    "paired_crops", "resize_bicubic_8bit", "scan_images", "standard_test_sets", "write_noisy_test_sets",
]
