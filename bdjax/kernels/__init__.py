"""Shared compiled building blocks: augmentation, train/eval steps, epochs."""

from bdjax.kernels.augment import crop_flip
from bdjax.kernels.steps import (SGDConfig, StepOptions, batch_indices, cross_entropy,
                                 evaluate, logits_in_batches, run_epoch, scan_epoch, sgd,
                                 to_unit, train_step)

__all__ = ["crop_flip", "SGDConfig", "StepOptions", "batch_indices", "cross_entropy",
           "evaluate", "logits_in_batches", "run_epoch", "scan_epoch", "sgd", "to_unit",
           "train_step"]
