"""The smoke grid on the embedded data: the sweep every test and CI run uses.

    bdjax sweep sweep_smoke --out runs/sweep_smoke           # a few minutes, 2-core CPU
    bdjax sweep sweep_smoke --out runs/sweep_smoke --plan    # what is done, what is left
    bdjax report runs/sweep_smoke/results.jsonl --out runs/sweep_smoke/report

Synthetic data (5,000 training and 1,000 test images), the small CNN, BadNets and
Blended at a 10% poisoning ratio (attack seed 0, target 0), then FT, FST and FT-SAM with
SPC 10 and 100, 3 trials each: 2 backdoored models, 12 defense cells, 36 defense runs.
Attack training and the defenses' settings are the ``synthetic`` config's (each value's
measured reason is in its docstring), except FT: 20 epochs instead of the reference's
100, to keep the grid within a few minutes.

``smoke=True`` (``--smoke``) shrinks it to seconds for the tests: 600 training images,
2 attack epochs, SPC 2 only, 2 trials, one or two defense epochs.
"""

from bdjax.configs import synthetic


def get_config(smoke: bool = False) -> dict:
    base = synthetic.get_config(False)
    sweep = {
        "datasets": ["synthetic"], "models": ["small_cnn"],
        "attacks": {"badnets": {}, "blended": {}},
        "poison_ratios": [0.1], "targets": [0], "attack_seeds": [0],
        # FT for 20 epochs instead of its 100 (the CPU budget; issue 8 measured the rest)
        "defenses": {"ft": {"epochs": 20}, "fst": {}, "ft_sam": {}},
        "spc": [10, 100], "trials": 3, "seed": 0,
    }
    cfg = {"dataset": "synthetic", "model": "small_cnn",
           "dataset_args": {"n_train": 5000, "n_test": 1000},
           "train": base["train"],
           "defenses": base["defenses"], "sweep": sweep}
    if smoke:
        cfg["dataset_args"] = {"n_train": 600, "n_test": 200}
        cfg["train"] = {**base["train"], "epochs": 2}
        cfg["defenses"] = {"ft": {"epochs": 2}, "fst": {"alpha": 0.02, "epochs": 1},
                           "ft_sam": {"epochs": 1, "batch_size": 128}}
        cfg["sweep"] = {**sweep, "defenses": {"ft": {}, "fst": {}, "ft_sam": {}},
                        "spc": [2], "trials": 2}
    return cfg
