"""The training loop shared by the example scripts (docs/training.md)."""
from .config import TrainConfig, add_train_args, config_from_args, parse_repeats
from .distributed import DistEnv, init_distributed
from .sampling import ResumableBatchSampler, SeededDataset
from .trainer import NonFiniteLossError, Trainer, move_to
from .validation import default_predict, validate

__all__ = ["DistEnv", "NonFiniteLossError", "ResumableBatchSampler", "SeededDataset", "TrainConfig", "Trainer",
           "add_train_args", "config_from_args", "default_predict", "init_distributed", "move_to",
           "parse_repeats", "validate"]
