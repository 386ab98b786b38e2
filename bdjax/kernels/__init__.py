"""Shared compiled building blocks: augmentation, optimizer, train/eval steps, epochs."""

from bdjax.kernels.augment import crop_flip
from bdjax.kernels.optim import SGDConfig, sgd
from bdjax.kernels.steps import (StepOptions, batch_indices, cross_entropy, evaluate,
                                 logits_in_batches, run_epoch, scan_epoch, smooth_labels,
                                 steps_per_epoch, to_unit, train_step)

__all__ = ["crop_flip", "SGDConfig", "StepOptions", "batch_indices", "cross_entropy",
           "evaluate", "logits_in_batches", "run_epoch", "scan_epoch", "sgd",
           "smooth_labels", "steps_per_epoch", "to_unit", "train_step"]
