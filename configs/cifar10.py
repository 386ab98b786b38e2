"""CIFAR-10 with BackdoorBench's settings (REFERENCE.md): run on an accelerator.

    bdjax attack --dataset cifar10 --data-archive ~/data/cifar-10-binary.tar.gz \
        --model preact_resnet18 --attack badnets --ratio 0.1 --target 0 --seed 0 \
        --out runs/cifar10-preact-badnets
    bdjax defend --checkpoint runs/cifar10-preact-badnets --defense ft --ratio 0.05 \
        --trials 5 --seed 0 --out runs/cifar10.jsonl

Attack training is 100 epochs of SGD (lr 0.01, momentum 0.9, wd 5e-4, batch 128, cosine);
the defenses use their registry defaults, which are the CIFAR-10 reference values.
``smoke=True`` runs 1 epoch and 2 FT epochs to check a set-up end to end.
"""


def get_config(smoke: bool = False) -> dict:
    if smoke:
        return {"dataset_args": {}, "train": {"epochs": 1}, "defenses": {"ft": {"epochs": 2}}}
    return {"dataset_args": {}, "train": {"epochs": 100, "batch_size": 128, "lr": 0.01},
            "defenses": {}}
