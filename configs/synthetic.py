"""Defaults for the embedded synthetic dataset on a CPU (the `bdjax demo` settings).

    bdjax attack --dataset synthetic --model small_cnn --attack badnets --ratio 0.1 \
        --target 0 --seed 0 --out runs/badnets
    bdjax defend --checkpoint runs/badnets --defense ft --spc 10 --trials 5 --seed 0 \
        --out runs/results.jsonl

Expected on a 2-core CPU: attack ~2 minutes (20 epochs of 10,000 images at ~4.5 s each;
clean ACC ~93%, BadNets ASR ~95%), FT over 5 vmapped trials well under a minute.

REFERENCE.md's attack training (100 epochs at lr 0.01) is scaled down to 20 epochs at
lr 0.05 so the small CNN converges within the CPU budget; the defenses keep their
reference settings. ``smoke=True`` shrinks everything for tests (seconds, not minutes).
"""


def get_config(smoke: bool = False) -> dict:
    if smoke:
        return {
            "dataset_args": {"n_train": 2000, "n_test": 500},
            "train": {"epochs": 3, "batch_size": 128, "lr": 0.05},
            "defenses": {"ft": {"epochs": 5}},
        }
    return {
        "dataset_args": {},
        "train": {"epochs": 20, "batch_size": 128, "lr": 0.05},
        "defenses": {},
    }
