"""The survey's CIFAR-10 settings (papers/001; its fork WhoDunnett/BackdoorBenchmark).

    bdjax attack --config survey_cifar10 --data-archive ~/data/cifar-10-binary.tar.gz \
        --attack blended --ratio 0.05 --seed 0 --out runs/survey/blended-5
    bdjax defend --config survey_cifar10 --checkpoint runs/survey/blended-5 \
        --defense fst --spc 10 --trials 10 --seed 0 --out runs/survey.jsonl

What the fork runs, where it differs from the defenses' defaults (the papers' own code):

- fst: 15 epochs, lr 0.01, alpha 0.2 (its argument defaults override its YAML, on every
  dataset; the FST paper: 10 epochs on CIFAR-10);
- npd: the training transform (crop and flip; BackdoorBench trains NPD without
  augmentation);
- the defender's data: SPC 2, 10 and 100, ten trials each; FT, FT-SAM, FST and NPD
  train on all of it, the defenses that select hold a validation split out (bdjax does
  this for every config: ``Defense.uses_validation``).

FT, FT-SAM and Grad-Prune run the same settings as the defaults (BackdoorBench's FT and
FT-SAM, the Grad-Prune authors' ``cifar10.yaml``). Attack training is BackdoorBench's
(the ``cifar10`` config). The ``sweep`` section is the survey's CIFAR-10 grid: 2 models
x its 8 attacks x 3 poisoning ratios x 20 defenses x 3 SPC x 10 trials = 28,800 defense
runs from 48 backdoored models. ``smoke=True`` shrinks every length for a set-up check.
"""


def get_config(smoke: bool = False) -> dict:
    defenses = {"fst": {"epochs": 15, "lr": 0.01, "alpha": 0.2},
                "npd": {"augment": True}}
    sweep = {
        "datasets": ["cifar10"],
        "models": ["preact_resnet18", "vgg19_bn"],
        "attacks": {"badnets": {}, "blended": {}, "sig": {}, "lf": {}, "ssba": {},
                    "iab": {}, "bpp": {}, "wanet": {}},
        "poison_ratios": [0.01, 0.05, 0.1],
        "targets": [0],
        "attack_seeds": [0],
        "defenses": {"ft": {}, "ft_sam": {}, "fst": {}, "lp": {}, "fe_tuning": {},
                     "ft_init": {}, "grad_prune": {}, "npd": {}, "fp": {}, "bnp": {},
                     "clp": {}, "anp": {}, "rnp": {}, "awm": {}, "mmbd": {}, "nad": {},
                     "pbe": {}, "ibau": {}, "sau": {}, "nc": {}},
        "spc": [2, 10, 100],
        "trials": 10,
        "seed": 0,
    }
    cfg = {"dataset": "cifar10", "model": "preact_resnet18",
           "train": {"epochs": 100, "batch_size": 128, "lr": 0.01},
           "defenses": defenses, "sweep": sweep}
    if smoke:
        cfg["train"] = {"epochs": 1}
        cfg["defenses"] = {**defenses, "fst": {**defenses["fst"], "epochs": 1},
                           "npd": {"augment": True, "epochs": 1, "warmup_epochs": 1},
                           "ft": {"epochs": 1}, "ft_sam": {"epochs": 1},
                           "grad_prune": {"epochs": 1, "max_rounds": 2}}
        cfg["sweep"] = {**sweep, "models": ["preact_resnet18"], "poison_ratios": [0.1],
                        "spc": [10], "trials": 2}
    return cfg
