"""Defaults for the embedded synthetic dataset on a CPU (the `bdjax demo` settings).

    bdjax attack --dataset synthetic --model small_cnn --attack badnets --ratio 0.1 \
        --target 0 --seed 0 --out runs/badnets
    bdjax defend --checkpoint runs/badnets --defense ft --spc 10 --trials 5 --seed 0 \
        --out runs/results.jsonl

Expected on a 2-core CPU: attack ~2 minutes (20 epochs of 10,000 images at ~4.5 s each;
clean ACC ~93%, BadNets ASR ~95%), FT over 5 vmapped trials well under a minute.

REFERENCE.md's attack training (100 epochs at lr 0.01) is scaled down to 20 epochs at
lr 0.05 so the small CNN converges within the CPU budget. The defenses keep their
reference settings except where the small CNN's scale needs another value:

- fst alpha 0.02 (paper: 0.2 for ResNet-18): the small CNN's head has ||W||^2 ~ 60-100,
  so with 0.2 the inner-product penalty (as low as -alpha ||W||^2) outweighs the CE
  loss and costs ~40 points of clean accuracy; 0.02 keeps the penalty at the CE's scale.
- CPU scaling of the long defenses (reference values in brackets): ft_sam 20 epochs at
  batch 128, lr 0.02 [100 epochs, batch 256, lr 0.01]; npd 10 main epochs [50];
  grad_prune's fine-tuning capped at 30 epochs [patience only, F_t = 10 kept]. On a GPU,
  pass --set epochs=100 etc. or a config of your own to get the reference runs.
- synthetic images are 32x32 like CIFAR but the dataset has no flips (REFERENCE: flips
  are a CIFAR convention); the runner sets flip=False from the dataset.

``smoke=True`` shrinks everything for tests (seconds, not minutes).
"""


# Attack training: a cosine over the whole run, per batch (REFERENCE's T_max = 100 epochs
# would leave the lr near its peak after 20 epochs).
TRAIN = {"epochs": 20, "batch_size": 128, "lr": 0.05, "schedule_unit": "batch", "t_max": 0}


def get_config(smoke: bool = False) -> dict:
    if smoke:
        return {
            "dataset": "synthetic", "model": "small_cnn",
            "dataset_args": {"n_train": 2000, "n_test": 500},
            "train": {**TRAIN, "epochs": 3},
            "defenses": {"ft": {"epochs": 5}, "fst": {"alpha": 0.02, "epochs": 2}},
        }
    return {
        "dataset": "synthetic", "model": "small_cnn",
        "dataset_args": {},
        "train": TRAIN,
        "defenses": {
            "fst": {"alpha": 0.02},
            "ft_sam": {"epochs": 20, "batch_size": 128, "lr": 0.02},
            "npd": {"epochs": 10},
            "grad_prune": {"epochs": 30},
        },
    }
