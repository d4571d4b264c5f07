"""Stage 1 (docs/method.md §1.2–1.3): K-fold medium images, prompt training and the perceiver audit.

``run_stage1`` (``perceive-ir stage1 run``) runs all of it with the authors' defaults; the other names are its
building blocks.
"""
from .audit import GATES, audit_perceiver
from .data import PairImages, TensorTriplets, TripletImages, check_triplet, shared_crop
from .folds import assign_folds, fold_of, relative_key
from .gates import medium_gates
from .manifest import read_jsonl, scan_pairs, write_jsonl
from .pipeline import AUTHORS_TASK_REPEATS, MediumSettings, PromptSettings, Stage1Result, run_stage1
from .render import build_triplets, render_medium, train_fold_restorer
from .report import audit_table, gates_table
from .train import train_prompts

__all__ = [
    "GATES", "audit_perceiver", "PairImages", "TensorTriplets", "TripletImages", "check_triplet", "shared_crop",
    "assign_folds", "fold_of", "relative_key", "medium_gates", "read_jsonl", "scan_pairs", "write_jsonl",
    "AUTHORS_TASK_REPEATS", "MediumSettings", "PromptSettings", "Stage1Result", "run_stage1",
    "build_triplets", "render_medium", "train_fold_restorer", "audit_table", "gates_table", "train_prompts",
]
