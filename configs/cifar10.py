"""CIFAR-10 with BackdoorBench's settings (REFERENCE.md): run on an accelerator.

    bdjax attack --dataset cifar10 --data-archive ~/data/cifar-10-binary.tar.gz \
        --attack badnets --ratio 0.1 --target 0 --seed 0 --out runs/cifar10-preact-badnets
    bdjax defend --checkpoint runs/cifar10-preact-badnets --defense ft --ratio 0.05 \
        --trials 5 --seed 0 --out runs/cifar10.jsonl

The model is PreAct-ResNet18, as BackdoorBench trains it (``--model vgg19_bn`` for the
other). Attack training is 100 epochs of SGD (lr 0.01, momentum 0.9, wd 5e-4, batch 128,
cosine stepped per epoch with T_max 100: the ``TrainConfig`` defaults); the defenses use
their registry defaults and ``dataset_settings``, which are the reference's CIFAR-10
values. On one H100 the attack takes minutes, not hours; on a 2-core CPU about a day.
``smoke=True`` runs 1 epoch and 2 FT epochs to check a set-up end to end.
"""


def get_config(smoke: bool = False) -> dict:
    if smoke:
        return {"dataset": "cifar10", "model": "preact_resnet18", "train": {"epochs": 1},
                "defenses": {"ft": {"epochs": 2}}}
    return {"dataset": "cifar10", "model": "preact_resnet18",
            "train": {"epochs": 100, "batch_size": 128, "lr": 0.01}, "defenses": {}}
