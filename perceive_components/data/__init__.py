"""Data helpers: degradations, standard layouts, crops, image scans and task-mixing batches."""
from .scan import ImageScanError, ScanResult, scan_images

__all__ = ["ImageScanError", "ScanResult", "scan_images"]
