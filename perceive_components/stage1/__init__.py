"""Stage 1 (SPEC.md §1.2–1.3): K-fold medium images, prompt training and the perceiver audit."""
from .audit import GATES, audit_perceiver
from .data import PairImages, TensorTriplets, TripletImages, check_triplet, shared_crop
from .folds import assign_folds, fold_of, relative_key
from .gates import medium_gates
from .manifest import read_jsonl, scan_pairs, write_jsonl
from .render import build_triplets, render_medium, train_fold_restorer
from .train import train_prompts

__all__ = [
    "GATES", "audit_perceiver", "PairImages", "TensorTriplets", "TripletImages", "check_triplet", "shared_crop",
    "assign_folds", "fold_of", "relative_key", "medium_gates", "read_jsonl", "scan_pairs", "write_jsonl",
    "build_triplets", "render_medium", "train_fold_restorer", "train_prompts",
]
