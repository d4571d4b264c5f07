"""Data helpers: degradations, standard layouts, crops, image scans and task-mixing batches."""
from .scan import ImageScanError, ScanResult, scan_images
from .task_batches import TaskMixingBatchSampler

__all__ = ["ImageScanError", "ScanResult", "TaskMixingBatchSampler", "scan_images"]
