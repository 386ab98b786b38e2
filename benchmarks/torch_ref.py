"""PyTorch reference implementations of bdjax's models and timed workloads.

The benchmark harness times bdjax against PyTorch on the same device, the same data and
the same batch sizes, in one process. This module is the PyTorch side, written from the
algorithms (REFERENCE.md) so that each unit of work does what the bdjax code it mirrors
does, with PyTorch's ordinary idioms (eager autograd, ``torch.optim.SGD``, in-place
updates, host-side early exits):

- ``train_step``: one SGD step, :func:`bdjax.kernels.steps.train_step` (no augmentation);
- ``ft_sam_epoch``: one epoch of ASAM steps, :func:`bdjax.kernels.sam.run_sam_epoch`
  (FT-SAM, no augmentation);
- ``npd_epoch``: one main-phase NPD epoch, ``_main_step`` of
  :mod:`bdjax.defenses.npd` over shuffled batches;
- ``grad_prune_round``: one pruning round, the loop body of ``_prune`` in
  :mod:`bdjax.defenses.grad_prune`.

The models (:func:`build`) are layer-for-layer mirrors of ``bdjax.models`` and
:func:`load_flax_state` copies a bdjax state into them, so :func:`logits` lets the
harness check that both libraries compute the same function before timing them.

torch is an optional, benchmark-only dependency: the harness imports this module only
when torch is importable.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Flax BatchNorm momentum 0.9 keeps 0.9 of the old statistics; PyTorch's momentum is the
# weight of the new batch, so the same rule is 0.1. Flax's default epsilon is 1e-5.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5

# SGD of every workload (bdjax.kernels.SGDConfig without the cosine schedule: a constant
# rate costs the same and keeps a single timed unit independent of the run length).
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4

# FT-SAM (REFERENCE.md, CIFAR-10 / PreAct-ResNet18) and bdjax.kernels.sam.EPS.
SAM_RHO, SAM_LABEL_SMOOTHING, SAM_EPS = 2.0, 0.1, 1e-12

# NPD main phase (REFERENCE.md, NPD row, CIFAR-10; bdjax NPDConfig defaults).
NPD_RADIUS, NPD_STEP, NPD_STEPS, NPD_STOP = 3.0, 0.1, 2, 0.6
NPD_LAMBDAS = (1.0, 0.4, 0.4, 0.4)  # L_bn, L_asr, L_bce margin, L_bce CE (lmd1, 4, 3, 2)
NPD_FLOOR, NPD_PGD_BOUND = 1e-4, 80.0
_TINY = 1e-12  # bdjax.kernels.pgd._TINY: keeps a zero perturbation's norm divisible

# The conv whose INPUT the polariser transforms: bdjax's ``ModelSpec.polariser_at``.
POLARISER_AT = {"small_cnn": "conv4", "preact_resnet18": "layer4_1/conv1",
                "vgg19_bn": "conv15"}

# bdjax.kernels.steps.evaluate's batch (Grad-Prune's validation).
EVAL_BATCH = 500

VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

Layers = list[tuple[str, nn.Module]]


# ----------------------------------------------------------------------------- models
def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SmallCNN(nn.Module):
    """bdjax ``small_cnn``: conv(16)-pool-conv(32)-pool-conv(64)-pool-conv(128)-GAP-linear,
    each conv 3x3 "SAME" without bias, followed by BN and ReLU."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.widths = widths
        cin = 3
        for i, width in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, width, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", _bn(width))
            cin = width
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(self.widths) + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i < len(self.widths):
                x = F.max_pool2d(x, 2, 2)
        return self.head(x.mean(dim=(2, 3)))

    def flax_layers(self) -> Layers:
        """(bdjax module name, torch module) for every layer with state."""
        layers = []
        for i in range(1, len(self.widths) + 1):
            layers += [(f"conv{i}", getattr(self, f"conv{i}")), (f"bn{i}", getattr(self, f"bn{i}"))]
        return layers + [("head", self.head)]


class PreActBlock(nn.Module):
    """Pre-activation block; the shortcut is a 1x1 conv on the pre-activated input when
    the shape changes (so ``conv1``'s input feeds the residual branch only)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.bn1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, width, 1, stride=stride, bias=False)
                         if stride != 1 or cin != width else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut

    def flax_layers(self, prefix: str) -> Layers:
        layers = [(f"{prefix}/bn1", self.bn1), (f"{prefix}/conv1", self.conv1),
                  (f"{prefix}/bn2", self.bn2), (f"{prefix}/conv2", self.conv2)]
        if self.shortcut is not None:
            layers.append((f"{prefix}/shortcut", self.shortcut))
        return layers


class PreActResNet18(nn.Module):
    """bdjax ``preact_resnet18`` (BackdoorBench's): 3x3 stem without BN/ReLU/max-pool,
    blocks [2, 2, 2, 2] of widths 64/128/256/512 and strides 1/2/2/2, no final BN+ReLU,
    global average pool, linear(512, C)."""

    def __init__(self, num_classes: int, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        cin = 64
        for stage, (n, width) in enumerate(zip(blocks, widths), start=1):
            stage_blocks = []
            for b in range(n):
                stride = 1 if stage == 1 or b > 0 else 2
                stage_blocks.append(PreActBlock(cin, width, stride))
                cin = width
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
        self.num_stages = len(blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.linear(x.mean(dim=(2, 3)))

    def flax_layers(self) -> Layers:
        layers = [("conv1", self.conv1)]
        for stage in range(1, self.num_stages + 1):
            for b, block in enumerate(getattr(self, f"layer{stage}")):
                layers += block.flax_layers(f"layer{stage}_{b}")
        return layers + [("linear", self.linear)]


class VGG19BN(nn.Module):
    """bdjax ``vgg19_bn`` in torchvision's layout: conv (with bias)-BN-ReLU stacks and
    2x2 max-pools, adaptive 7x7 average pool (at 32x32 it replicates the 512x1x1
    features), classifier 25088-4096-4096-C with ReLU and dropout 0.5."""

    def __init__(self, num_classes: int, layout: tuple = VGG19):
        super().__init__()
        layers, cin = [], 3
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), _bn(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    def flax_layers(self) -> Layers:
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        bns = [m for m in self.features if isinstance(m, nn.BatchNorm2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]
        layers = []
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            layers += [(f"conv{i}", conv), (f"bn{i}", bn)]
        return layers + [(f"fc{k}", fc) for k, fc in enumerate(fcs)]


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "small_cnn": SmallCNN, "preact_resnet18": PreActResNet18, "vgg19_bn": VGG19BN}


def build(model_name: str, num_classes: int) -> nn.Module:
    """The PyTorch mirror of bdjax's model ``model_name`` (inputs: normalised NCHW floats).

    Args:
      model_name: ``small_cnn``, ``preact_resnet18`` or ``vgg19_bn``.
      num_classes: output width.

    Returns:
      A freshly initialised module (PyTorch's default initialisation) in train mode.

    Raises:
      ValueError: for an unknown model name.
    """
    if model_name not in _BUILDERS:
        raise ValueError(f"unknown model {model_name!r}; accepted: {sorted(_BUILDERS)}.")
    return _BUILDERS[model_name](int(num_classes))


# ------------------------------------------------------------------ bdjax state import
def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a/b/kernel": array}`` for a nested mapping of arrays."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = np.asarray(value, dtype=np.float32)
    return out


def _targets(module: nn.Module) -> tuple[dict, dict]:
    """Where each bdjax leaf goes: ``{flax name: (torch tensor, layout fn)}`` for the
    params and for the batch statistics."""
    hwio_to_oihw = lambda a: a.transpose(3, 2, 0, 1)
    in_out_to_out_in = lambda a: a.T
    same = lambda a: a
    params, stats = {}, {}
    for name, layer in module.flax_layers():
        if isinstance(layer, nn.Conv2d):
            params[f"{name}/kernel"] = (layer.weight, hwio_to_oihw)
        elif isinstance(layer, nn.Linear):
            params[f"{name}/kernel"] = (layer.weight, in_out_to_out_in)
        elif isinstance(layer, nn.BatchNorm2d):
            params[f"{name}/scale"] = (layer.weight, same)
            stats[f"{name}/mean"] = (layer.running_mean, same)
            stats[f"{name}/var"] = (layer.running_var, same)
        if getattr(layer, "bias", None) is not None:
            params[f"{name}/bias"] = (layer.bias, same)
    return params, stats


def _check_names(kind: str, got: dict, want: dict) -> None:
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"the bdjax {kind} do not match the torch model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}.")


def load_flax_state(module: nn.Module, params: Mapping, batch_stats: Mapping) -> None:
    """Copies a bdjax model state into ``module`` (a model from :func:`build`).

    Conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in), BatchNorm
    scale/bias/mean/var -> weight/bias/running_mean/running_var.

    Args:
      module: the torch mirror of the bdjax model.
      params: ``state["params"]`` (nested dicts of numpy or jax arrays).
      batch_stats: ``state["batch_stats"]``.

    Raises:
      ValueError: when a leaf name or shape does not match the torch model.
    """
    want_params, want_stats = _targets(module)
    flat_params, flat_stats = _flatten(params), _flatten(batch_stats)
    _check_names("params", flat_params, want_params)
    _check_names("batch_stats", flat_stats, want_stats)
    pairs = [(name, flat_params[name], *want_params[name]) for name in want_params]
    pairs += [(name, flat_stats[name], *want_stats[name]) for name in want_stats]
    with torch.no_grad():
        for name, value, tensor, layout in pairs:
            # A writable copy: jax-backed numpy views are read-only, which torch warns of.
            value = np.array(layout(value), dtype=np.float32, order="C")
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"bdjax leaf {name!r} has shape {value.shape} after layout "
                                 f"conversion; the torch model expects {tuple(tensor.shape)}.")
            tensor.copy_(torch.from_numpy(value))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float inputs pass through (bdjax ``to_unit``)."""
    return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x


class _Input:
    """bdjax ``Model.normalize`` plus the layout change: NHWC uint8 or [0, 1] float ->
    normalised NCHW float32, contiguous (PyTorch's default memory format)."""

    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((_unit(x) - self.mean) / self.std).permute(0, 3, 1, 2).contiguous()


def logits(model_name: str, num_classes: int, mean, std, params: Mapping,
           batch_stats: Mapping, x_uint8: np.ndarray) -> np.ndarray:
    """Eval-mode logits of the torch mirror loaded with a bdjax state (on the CPU).

    Args:
      model_name, num_classes: as :func:`build`.
      mean, std: per-channel normalisation in [0, 1] units (bdjax ``Model.mean/std``).
      params, batch_stats: the bdjax state.
      x_uint8: images ``[N, H, W, C]`` uint8.

    Returns:
      float32 logits ``[N, num_classes]``, to compare with bdjax's ``model.apply``.
    """
    module = build(model_name, num_classes)
    load_flax_state(module, params, batch_stats)
    module.eval()
    with torch.no_grad():
        out = module(_Input(mean, std, "cpu")(torch.from_numpy(np.array(x_uint8))))
    return out.numpy()


# ------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    """Waits for queued device work, so a timed unit ends when its work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sgd(parameters) -> torch.optim.SGD:
    # torch's coupled weight decay (g + wd * w before momentum) is optax's
    # add_decayed_weights followed by sgd(momentum), as bdjax.kernels.sgd chains them.
    return torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           nesterov=False)


def _epoch_batches(rng: np.random.Generator, n: int, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """A shuffled epoch as ``[steps, batch]`` indices (bdjax ``batch_indices``): the
    last batch is filled with the first images of the same permutation, so every batch
    has the same shape."""
    bs = min(batch_size, n)
    steps = -(-n // bs)
    perm = rng.permutation(n)
    idx = np.concatenate([perm, perm[:steps * bs - n]]).reshape(steps, bs)
    return torch.from_numpy(idx).to(device)


@contextlib.contextmanager
def _batch_stats_without_update(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with batch statistics but leaves its running statistics
    (and ``num_batches_tracked``) untouched, as bdjax discarding the new batch_stats.

    A training-mode BatchNorm with ``track_running_stats`` off normalises with the batch
    and passes no running buffers to the kernel, so nothing is copied or restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) for m in model.modules())


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


# ---------------------------------------------------------------------- train step
class _TrainStep:
    """One SGD step on a fixed batch (bdjax ``train_step`` without augmentation)."""

    def __init__(self, model, inp, x, y, batch_size, device):
        self.model, self.inp, self.device = model.train(), inp, device
        self.x, self.y = x[:batch_size], y[:batch_size]
        self.opt = _sgd(model.parameters())

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.inp(self.x)), self.y).backward()
        self.opt.step()
        _sync(self.device)


# ------------------------------------------------------------------------- FT-SAM
def asam_perturbation(params: list[torch.Tensor], grads, rho: float) -> list[torch.Tensor]:
    """ASAM's ``e = rho * w^2 * g / (|| |w| * g ||_2 + 1e-12)``, the norm global over all
    ``params`` (bdjax ``sam_perturbation`` with ``adaptive=True``; FT-SAM eq. 4).

    The ``_foreach`` ops run each step over all tensors in a few launches, as
    ``torch.optim`` does; the scale stays a device tensor (no host sync).
    """
    scaled = torch._foreach_mul(torch._foreach_abs(params), grads)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
    e = torch._foreach_mul(torch._foreach_mul(params, params), grads)
    torch._foreach_mul_(e, rho / (norm + SAM_EPS))
    return e


def smooth_cross_entropy(logits, y, eps: float) -> torch.Tensor:
    """Cross-entropy against 1 - eps on the true class and eps / (C - 1) on the others
    (BackdoorBench's smooth_crossentropy; bdjax ``cross_entropy``)."""
    t = torch.full_like(logits, eps / (logits.shape[-1] - 1)).scatter(1, y[:, None], 1 - eps)
    return -(t * F.log_softmax(logits, -1)).sum(-1).mean()


class _FTSAMEpoch:
    """One shuffled epoch of ASAM steps (bdjax ``run_sam_epoch``, adaptive, no
    augmentation)."""

    def __init__(self, model, inp, x, y, batch_size, device, rng):
        self.model, self.inp, self.device, self.rng = model.train(), inp, device, rng
        self.x, self.y, self.batch_size = x, y, batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _sgd(self.params)
        self.dropout = _has_dropout(model)

    def _loss(self, xb, yb) -> torch.Tensor:
        return smooth_cross_entropy(self.model(xb), yb, SAM_LABEL_SMOOTHING)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One ASAM step: gradient at w (this pass moves the BN running statistics),
        gradient at w + e (it does not), SGD update at w with the second gradient."""
        # bdjax gives both passes the same dropout key: replay the same masks (VGG).
        rng = _rng_state(self.device) if self.dropout else None
        grads = torch.autograd.grad(self._loss(xb, yb), self.params)
        with torch.no_grad():
            e = asam_perturbation(self.params, grads, SAM_RHO)
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_add_(self.params, e)
        if rng is not None:
            _set_rng_state(self.device, rng)
        self.opt.zero_grad(set_to_none=True)
        with _batch_stats_without_update(self.model):
            self._loss(xb, yb).backward()
        with torch.no_grad():
            # Copy back rather than subtract e: the update must start from w exactly.
            torch._foreach_copy_(self.params, saved)
        self.opt.step()

    def __call__(self) -> None:
        for idx in _epoch_batches(self.rng, self.x.shape[0], self.batch_size, self.device):
            self.step(self.inp(self.x[idx]), self.y[idx])
        _sync(self.device)


# ---------------------------------------------------------------------------- NPD
def identity_polariser(channels: int) -> nn.Sequential:
    """NPD's polariser: 1x1 conv C -> C without bias (identity) + BatchNorm (scale 1,
    bias 0, running mean 0, variance 1), as bdjax ``init_polariser``."""
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
    return nn.Sequential(conv, _bn(channels))


def _masked_argmax(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmax over the classes other than ``y``."""
    return logits.scatter(1, y[:, None], float("-inf")).argmax(-1)


def _log_one_minus_softmax(logits: torch.Tensor, k: torch.Tensor,
                           floor: float = 0.0) -> torch.Tensor:
    """``log(1 - softmax(logits)[k] + floor)`` as logsumexp over the other classes minus
    logsumexp over all, floored through logaddexp (bdjax ``log_one_minus_softmax``)."""
    others = logits.scatter(1, k[:, None], float("-inf"))
    out = torch.logsumexp(others, -1) - torch.logsumexp(logits, -1)
    if floor:
        out = torch.logaddexp(out, torch.log(torch.tensor(floor + 1e-12, device=out.device)))
    return out


def npd_loss(logits_clean, logits_adv, y, y_target, y_pred) -> torch.Tensor:
    """NPD's Eq. (5) as BackdoorBench computes it (bdjax ``npd_losses``): L_bn, the floored
    L_asr, L_bce's floored margin term and its cross-entropy toward the clean prediction."""
    l_bn = F.cross_entropy(logits_clean, y)
    l_asr = -_log_one_minus_softmax(logits_adv, y_target, NPD_FLOOR).mean()
    top_other = _masked_argmax(logits_adv.detach(), y)
    l_margin = -_log_one_minus_softmax(logits_adv, top_other, NPD_FLOOR).mean()
    l_ce = F.cross_entropy(logits_adv, y_pred)
    l1, l2, l3, l3ce = NPD_LAMBDAS
    return l1 * l_bn + l2 * l_asr + l3 * l_margin + l3ce * l_ce


def _project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return delta * torch.clamp(eps / torch.clamp(norm, min=_TINY), max=1.0)


def targeted_pgd(logits_fn, x: torch.Tensor, target: torch.Tensor, *, eps: float,
                 step: float, steps: int, stop_fraction: float):
    """BackdoorBench NPD's targeted PGD (bdjax ``pgd(..., exit_check="after",
    freeze_successes=False, clip="image", loss_bound=80)``): from zero, each step moves
    every sample by ``-step * sign(g)`` of the clamped CE toward ``target``, projects the
    perturbation on the L2 ball (unclipped; only the image is clamped), then stops when
    more than ``stop_fraction`` of the batch hits its target.

    Returns:
      ``(x_adv, success_rate)``; the rate (a device scalar) is measured at ``x_adv``.
    """
    delta = torch.zeros_like(x)
    image = lambda d: (x + d).clamp(0.0, 1.0)
    for _ in range(steps):
        delta.requires_grad_(True)
        out = logits_fn(image(delta))
        ce = F.cross_entropy(out, target, reduction="none")
        ce = ce.clamp(-NPD_PGD_BOUND, NPD_PGD_BOUND)
        (g,) = torch.autograd.grad(ce.sum(), delta)
        delta = _project_l2(delta.detach() - step * g.sign(), eps)
        with torch.no_grad():
            rate = (logits_fn(image(delta)).argmax(-1) == target).float().mean()
        # A host-side early exit: PyTorch's idiom for bdjax's while_loop condition.
        if rate.item() > stop_fraction:
            break
    x_adv = image(delta)
    with torch.no_grad():
        rate = (logits_fn(x_adv).argmax(-1) == target).float().mean()
    return x_adv, rate


def _named_layer(model: nn.Module, flax_name: str) -> nn.Module:
    layers = dict(model.flax_layers())
    if flax_name not in layers:
        raise ValueError(f"the torch model has no layer {flax_name!r}; accepted: "
                         f"{sorted(layers)}.")
    return layers[flax_name]


class _NPDEpoch:
    """One main-phase NPD epoch (bdjax ``_main_step`` over shuffled batches): frozen
    eval-mode backbone, polariser (BN in eval mode) on the input of the conv bdjax names
    ``polariser_at``, only the polariser learns."""

    def __init__(self, model, model_name, inp, x, y, batch_size, device, rng):
        self.model = model.eval().requires_grad_(False)
        self.inp, self.device, self.rng = inp, device, rng
        self.x, self.y, self.batch_size = x, y, batch_size
        target = _named_layer(model, POLARISER_AT[model_name])
        self.polariser = identity_polariser(target.in_channels).to(device).eval()
        # A forward pre-hook swaps the conv's input, so the model classes stay untouched.
        target.register_forward_pre_hook(lambda _, args: (self.polariser(args[0]),) + args[1:])
        self.opt = _sgd(self.polariser.parameters())
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (loss, pgd success)

    def logits_fn(self, x01: torch.Tensor) -> torch.Tensor:
        """Logits of the polarised model for NHWC images in [0, 1]."""
        return self.model(self.inp(x01))

    def step(self, xb: torch.Tensor, yb: torch.Tensor):
        with torch.no_grad():
            clean = self.logits_fn(xb)
            y_target, y_pred = _masked_argmax(clean, yb), clean.argmax(-1)
        x_adv, rate = targeted_pgd(self.logits_fn, xb, y_target, eps=NPD_RADIUS,
                                   step=NPD_STEP, steps=NPD_STEPS, stop_fraction=NPD_STOP)
        self.opt.zero_grad(set_to_none=True)
        # BN in eval mode keeps samples independent: one pass serves both batches.
        out = self.logits_fn(torch.cat([xb, x_adv.detach()]))
        b = xb.shape[0]
        loss = npd_loss(out[:b], out[b:], yb, y_target, y_pred)
        loss.backward()
        self.opt.step()
        return loss.detach(), rate

    def __call__(self) -> None:
        stats = [self.step(_unit(self.x[idx]), self.y[idx])
                 for idx in _epoch_batches(self.rng, self.x.shape[0], self.batch_size,
                                           self.device)]
        self.history.append(tuple(torch.stack(s).mean() for s in zip(*stats)))
        _sync(self.device)


# --------------------------------------------------------------------- Grad-Prune
class _GradPruneRound:
    """One Grad-Prune pruning round per call (the body of bdjax ``_prune``'s loop):
    score every conv filter by the mean absolute gradient of the unlearning loss
    CE(f(trigger(x)), y_true) summed over the defender's batches, zero the top unpruned
    filter, evaluate the validation clean accuracy and unlearning loss. State (the
    pruned filters) carries over between calls."""

    def __init__(self, model, inp, x, x_trig, y, batch_size, device, rng):
        self.model, self.inp, self.device = model, inp, device
        self.x_trig, self.y = x_trig, y
        # Every 4-D kernel, shortcut 1x1 convs included; only their gradients are scored,
        # so no other parameter needs one.
        self.convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        model.requires_grad_(False)
        for conv in self.convs:
            conv.weight.requires_grad_(True)
        sizes = [c.out_channels for c in self.convs]
        self.offsets = np.cumsum([0] + sizes)
        self.pruned = torch.zeros(sum(sizes), dtype=torch.bool, device=device)
        self.batches, self.weights = self._even_batches(rng, x.shape[0], batch_size)
        n_val = min(x.shape[0], max(10, x.shape[0] // 10))
        self.x_val, self.x_val_trig, self.y_val = x[:n_val], x_trig[:n_val], y[:n_val]
        self.history: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _even_batches(self, rng, n: int, batch_size: int):
        """One fixed shuffle in ``ceil(n / batch)`` equal batches plus 0/1 weights, so
        the filler slots count zero (bdjax ``_even_batches``)."""
        steps = -(-n // min(batch_size, n))
        bs = -(-n // steps)
        perm = rng.permutation(n)
        idx = np.concatenate([perm, perm[:steps * bs - n]]).reshape(steps, bs)
        weight = (np.arange(steps * bs) < n).astype(np.float32).reshape(steps, bs)
        return torch.from_numpy(idx).to(self.device), torch.from_numpy(weight).to(self.device)

    def scores(self) -> torch.Tensor:
        """Per-filter mean |sum of batch gradients| of every conv, concatenated."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with _batch_stats_without_update(self.model):
            for idx, w in zip(self.batches, self.weights):
                ce = F.cross_entropy(self.model(self.inp(self.x_trig[idx])), self.y[idx],
                                     reduction="none")
                # .grad accumulates over backward calls: the sum over batches.
                ((w * ce).sum() / idx.shape[0]).backward()
        return torch.cat([c.weight.grad.abs().mean(dim=(1, 2, 3)) for c in self.convs])

    def _prune(self, flat: int) -> None:
        layer = int(np.searchsorted(self.offsets, flat, side="right")) - 1
        conv, f = self.convs[layer], flat - int(self.offsets[layer])
        with torch.no_grad():
            conv.weight[f].zero_()
            if conv.bias is not None:  # bdjax masks a conv's bias with its kernel
                conv.bias[f].zero_()
        self.pruned[flat] = True

    @torch.no_grad()
    def _validate(self):
        """(clean accuracy, unlearning loss) of the eval-mode model (bdjax
        ``_val_metrics``, batches of 500 as ``evaluate``)."""
        self.model.eval()
        outs = []
        for x in (self.x_val, self.x_val_trig):
            outs.append(torch.cat([self.model(self.inp(x[i:i + EVAL_BATCH]))
                                   for i in range(0, x.shape[0], EVAL_BATCH)]))
        acc = (outs[0].argmax(-1) == self.y_val).float().mean()
        return acc, F.cross_entropy(outs[1], self.y_val)

    def __call__(self) -> None:
        if bool(self.pruned.all()):
            raise ValueError("every conv filter is already pruned; accepted: at most "
                             f"{self.pruned.numel()} Grad-Prune rounds.")
        scores = self.scores().masked_fill(self.pruned, float("-inf"))
        pick = int(scores.argmax())
        self._prune(pick)
        self.history.append((pick, *self._validate()))
        _sync(self.device)


# -------------------------------------------------------------------------- entry
def workloads(model_name: str, num_classes: int, mean, std, x: np.ndarray, y: np.ndarray,
              x_trig: np.ndarray, *, device="cpu", batch_size: int = 128,
              seed: int = 0) -> dict[str, Callable[[], None]]:
    """The timed PyTorch units of work, each on its own copy of one initialised model.

    The data goes to ``device`` once, as uint8; every unit converts its batches (uint8
    -> [0, 1] -> normalised NCHW) inside, as bdjax does inside its compiled step, and
    synchronises the device before returning.

    Args:
      model_name, num_classes: as :func:`build`.
      mean, std: per-channel normalisation in [0, 1] units.
      x: clean images ``[N, H, W, C]`` uint8.
      y: integer labels ``[N]``.
      x_trig: the trigger-stamped copy of ``x`` (uint8, same shape).
      device: torch device.
      batch_size: batch of every workload.
      seed: seeds torch (initialisation, dropout) and the numpy shuffles.

    Returns:
      ``{"train_step", "ft_sam_epoch", "npd_epoch", "grad_prune_round"}`` -> callables
      taking no argument; ``grad_prune_round`` prunes one more filter per call.

    Raises:
      ValueError: for an unknown model or inconsistent data shapes.
    """
    # Own, writable copies: torch shares numpy memory and warns of read-only arrays.
    x, x_trig, y = np.array(x), np.array(x_trig), np.array(y)
    if x.dtype != np.uint8 or x_trig.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"x and x_trig must be uint8 [N, H, W, C]; got {x.dtype} "
                         f"{x.shape} and {x_trig.dtype} {x_trig.shape}.")
    if x_trig.shape != x.shape or y.shape != x.shape[:1]:
        raise ValueError(f"x {x.shape}, x_trig {x_trig.shape} and y {y.shape} must share "
                         "N (and x_trig the image shape).")
    device = torch.device(device)
    torch.manual_seed(seed)
    base = build(model_name, num_classes).to(device)
    # One shuffle stream per workload, so the order in which they run changes nothing.
    rng_sam, rng_npd, rng_prune = (np.random.default_rng(s)
                                   for s in np.random.SeedSequence(seed).spawn(3))
    inp = _Input(mean, std, device)
    xd = torch.from_numpy(x).to(device)
    xtd = torch.from_numpy(x_trig).to(device)
    yd = torch.from_numpy(y.astype(np.int64)).to(device)
    fresh = lambda: copy.deepcopy(base)
    return {
        "train_step": _TrainStep(fresh(), inp, xd, yd, batch_size, device),
        "ft_sam_epoch": _FTSAMEpoch(fresh(), inp, xd, yd, batch_size, device, rng_sam),
        "npd_epoch": _NPDEpoch(fresh(), model_name, inp, xd, yd, batch_size, device, rng_npd),
        "grad_prune_round": _GradPruneRound(fresh(), inp, xd, xtd, yd, batch_size, device,
                                            rng_prune),
    }


__all__ = ["build", "load_flax_state", "logits", "workloads", "asam_perturbation",
           "identity_polariser", "npd_loss", "targeted_pgd"]
