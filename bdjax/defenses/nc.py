"""NC (Neural Cleanse): reverse-engineer a trigger per class, flag the class whose trigger
is abnormally small, unlearn it by fine-tuning on images stamped with it.

1. Reverse engineering, for every class t (all classes in one compiled program): a mask
   ``m = tanh(m_raw) / (2 + 1e-7) + 0.5`` (one channel, H x W) and a pattern ``p`` (the
   image's channels, same squashing), the raw tensors starting at 1, stamp
   ``x' = (1 - m) x + m p`` in [0, 1] pixel space (the reference stamps normalised
   images with a normalised pattern: the same images) on the defender's images
   (training augmentation, model in eval mode) and take Adam steps on
   ``CE(f(x'), t) + cost ||m||_1``. After each epoch (a shuffled pass; accuracy and
   ``||m||_1`` averaged over its batches): if the accuracy toward t reaches
   ``success_threshold`` and ``||m||_1`` is below the best so far, the epoch's final
   mask and pattern become the best (the first epoch's are kept when none succeeds).
   The cost starts at ``init_cost``: after ``patience`` successful epochs in a row it
   is multiplied by ``cost_multiplier``, after ``patience`` failed ones divided by
   ``cost_multiplier ** 1.5``. Early stop (per class): ``early_stop_patience`` epochs
   without the best norm improving by ``1 - early_stop_threshold``, once the cost has
   moved both ways.
2. Outlier detection: ``l`` = L1 norms of the best masks; ``MAD = 1.4826 median(|l -
   median(l)|)``; anomaly index ``|l - median(l)| / MAD``; a class at or below the
   median with index above ``mad_threshold`` is flagged (the backdoor target).
3. Unlearning: a random ``unlearning_ratio`` of the defender's images is stamped with
   each flagged class's trigger (uint8, ``round((1 - m) x + 255 m p)``) and keeps its
   TRUE labels; with k flagged classes the same images are stamped once per class, so
   the fine-tuning set holds the other images plus k stamped copies (as the reference
   builds it). The model is fine-tuned on that set (SGD, training mode, augmentation,
   cosine per epoch) and the last epoch's model is the result. With no flagged class
   the model is returned unchanged.

Defaults (the survey's fork, ``defense/nc.py`` with ``config/defense/nc/cifar10.yaml``;
its argparse has no defaults, so the YAML holds): 80 reverse-engineering epochs, Adam
lr 0.1 with betas (0.5, 0.9) (hard-coded), init cost 1e-3, multiplier 2 (down 2 **
1.5), patience 5, success threshold 98%, early stop on with threshold 0.99 and patience
25, batch 256 for both phases, training transform in both, the anomaly threshold 2
(hard-coded), unlearning ratio 0.2, fine-tuning 100 epochs, SGD lr 0.01, momentum 0.9,
weight decay 5e-4, cosine per epoch with T_max 100. All of the defender's images are used
(the fork draws its SPC images with ``val_ratio=0``; no validation split).

Differences from the reference code:

- The defended model is the fine-tuned one. The reference fine-tunes one copy of the
  model and evaluates and saves another, freshly loaded copy (an accident).
- The stamped images are ``(1 - m) x + 255 m p`` with the best mask and pattern. The
  reference round-trips them through PNG files saved with ``normalize=True`` (each
  min-max rescaled), adds ``x (1 - mask) + 255 trigger`` and casts to uint8 before
  clipping, so values above 255 wrap around (accidents).
- The stamped images are a random ``unlearning_ratio`` of the defender's images. The
  reference takes the LAST 20% of its subset, which its SPC sampler orders class by
  class, so they come from two classes only; its SPC path also re-draws the subset for
  fine-tuning and then reads ``ran_idx``, which only its ratio path defines (it fails
  whenever a class is flagged). bdjax uses the defender's one set for both phases.
- All classes are reverse-engineered together on the same shuffled, augmented batches
  (the reference runs them one after another, each with its own shuffles). The
  early-stopped classes keep their result while the others finish.
- The last partial batch of an epoch is filled with images of the same pass instead of
  being smaller (static shapes), in both phases.
- The median is the reference's ``torch.median`` (the lower middle value of an even
  count); ``median="average"`` gives numpy's, as in the NC authors' code.
- The reference's branch for a zero cost (``init_cost=0``) is not offered.

The NC paper mitigates by pruning (the neurons the reversed trigger excites) or by
unlearning; the fork, and bdjax, unlearn. ``unlearn=False`` keeps the model unchanged
(detection only). ``class_chunk`` reverse-engineers that many classes at a time (memory
on big models or many classes; the same result up to float rounding). ``nc_batch_size`` and
``nc_batches`` fix the images per reverse-engineering epoch whatever the SPC (e.g. 1
batch of 100: the reference's SPC 10 regime; at SPC 100 ~10x less work than its 4
batches of 256). Reverse engineering passes every image once per class, so it costs C
times a fine-tuning epoch's work per epoch.

References:
  Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
  Networks", IEEE S&P 2019; the survey (papers/001), section IV;
  WhoDunnett/BackdoorBenchmark ``defense/nc.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from bdjax.data import DefenseData
from bdjax.errors import BdjaxError, check_choice, check_range
from bdjax.kernels import StepOptions, batch_indices, crop_flip, to_unit, train_step
from bdjax.models import Model, State
from bdjax.train import TrainConfig

EPSILON = 1e-7  # the reference's tanh squashing: tanh(z) / (2 + eps) + 0.5
MAD_CONSTANT = 1.4826  # MAD of a normal sample -> its standard deviation
MEDIANS = ("lower", "average")


@dataclasses.dataclass(frozen=True)
class NCConfig(TrainConfig):
    """NC settings: the fine-tuning run of :class:`TrainConfig` with batch 256 (also
    the reverse-engineering batch unless ``nc_batch_size``), plus:

    Attributes:
      flip: horizontal flips in augmentation (set from the dataset by the runner).
      nc_epochs: reverse-engineering epochs per class (at most; early stop).
      mask_lr, beta1, beta2: the trigger's Adam.
      init_cost: the starting weight of ``||m||_1``.
      cost_multiplier: the cost's factor up (down: its power 1.5).
      patience: successful (failed) epochs in a row before the cost goes up (down).
      success_threshold: accuracy toward the class that counts as success.
      early_stop: stop a class early (``early_stop_threshold``, ``early_stop_patience``).
      early_stop_threshold: an improvement is a best norm below this times the previous.
      early_stop_patience: epochs without improvement before the stop.
      nc_batch_size: reverse-engineering batch (0 = ``batch_size``), per class.
      nc_batches: batches per reverse-engineering epoch, each a random subset of the
        images (0 = one shuffled pass, the reference).
      nc_augment: training augmentation of the reverse-engineering batches.
      class_chunk: classes reverse-engineered at a time (0 = all).
      mad_threshold: anomaly index above which a class is flagged.
      median: ``lower`` (torch, the reference) or ``average`` (numpy).
      unlearning_ratio: fraction of the defender's images stamped per flagged class.
      unlearn: fine-tune when a class is flagged (False: detection only).
    """

    batch_size: int = 256
    flip: bool = True
    nc_epochs: int = 80
    mask_lr: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    cost_multiplier: float = 2.0
    patience: int = 5
    success_threshold: float = 0.98
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    nc_batch_size: int = 0
    nc_batches: int = 0
    nc_augment: bool = True
    class_chunk: int = 0
    mad_threshold: float = 2.0
    median: str = "lower"
    unlearning_ratio: float = 0.2
    unlearn: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("nc_epochs", "patience", "early_stop_patience"):
            if getattr(self, name) < 1:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 1.")
        for name in ("mask_lr", "init_cost", "mad_threshold"):
            if not getattr(self, name) > 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: > 0.")
        check_range("beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_range("beta2", self.beta2, 0.0, 1.0, high_open=True)
        if not self.cost_multiplier >= 1:
            raise BdjaxError(f"cost_multiplier {self.cost_multiplier!r} is invalid; "
                             "accepted: >= 1.")
        check_range("success_threshold", self.success_threshold, 0.0, 1.0, low_open=True)
        check_range("early_stop_threshold", self.early_stop_threshold, 0.0, 1.0,
                    low_open=True)
        for name, zero in (("class_chunk", "all classes at once"),
                           ("nc_batch_size", "batch_size"), ("nc_batches", "one pass")):
            if getattr(self, name) < 0:
                raise BdjaxError(f"{name} {getattr(self, name)!r} is invalid; accepted: >= 0 "
                                 f"(0 = {zero}).")
        check_choice("median", self.median, MEDIANS)
        check_range("unlearning_ratio", self.unlearning_ratio, 0.0, 1.0, low_open=True,
                    high_open=True)

    @property
    def uses_validation(self) -> bool:
        return False


def squash(raw):
    """The reference's box constraint: ``tanh(raw) / (2 + 1e-7) + 0.5`` in (0, 1)."""
    return jnp.tanh(raw) / (2 + EPSILON) + 0.5


def stamp(x, mask, pattern):
    """uint8 images with a reversed trigger: ``round((1 - m) x + 255 m p)``; ``mask``
    [..., H, W, 1] and ``pattern`` [..., H, W, C] in [0, 1] broadcast against ``x``."""
    out = (1.0 - mask) * x.astype(jnp.float32) + mask * (255.0 * pattern)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


def _median(v, kind: str):
    if kind == "average":
        return jnp.median(v)
    return jnp.sort(v)[(v.shape[0] - 1) // 2]  # torch.median: the lower middle value


def anomaly_index(norms, median: str = "lower"):
    """(``|l - median(l)| / (1.4826 median(|l - median(l)|))`` per class, the median);
    0 where a norm equals the median."""
    med = _median(norms, median)
    dev = jnp.abs(norms - med)
    mad = MAD_CONSTANT * _median(dev, median)
    return jnp.where(dev == 0, 0.0, dev / mad), med  # MAD 0: inf off the median


def flag(norms, config: NCConfig):
    """(anomaly index [C], flagged [C] bool): classes at or below the median whose index
    exceeds ``mad_threshold``."""
    index, med = anomaly_index(norms, config.median)
    return index, (norms <= med) & (index > config.mad_threshold)


def _reverse(model: Model, state: State, x, config: NCConfig, key, targets):
    """Reverse engineering for the classes ``targets`` [c] together; returns a dict of
    per-class arrays (best mask and pattern, their L1 norm, whether the success
    threshold was ever reached, epochs run)."""
    c = targets.shape[0]
    n, h, w, ch = x.shape
    tx = optax.adam(config.mask_lr, b1=config.beta1, b2=config.beta2)
    raw = {"mask": jnp.ones((c, h, w, 1), jnp.float32),
           "pattern": jnp.ones((c, h, w, ch), jnp.float32)}

    def loss_fn(raw, xb, cost):
        mask, pattern = squash(raw["mask"]), squash(raw["pattern"])
        xs = (1 - mask[:, None]) * xb[None] + mask[:, None] * pattern[:, None]
        bs = xb.shape[0]
        logits = model.apply(state, xs.reshape(c * bs, h, w, ch)).reshape(c, bs, -1)
        labels = jnp.broadcast_to(targets[:, None], (c, bs))
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), 1)
        reg = jnp.sum(mask, axis=(1, 2, 3))  # ||m||_1 (m > 0)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels, 1)
        return jnp.sum(ce + cost * reg), (acc, reg)  # classes independent: sum of losses

    def step(carry, inp):
        raw, opt, cost = carry
        idx, k = inp
        xb = crop_flip(x[idx], k, flip=config.flip) if config.nc_augment else x[idx]
        (_, (acc, reg)), g = jax.value_and_grad(loss_fn, has_aux=True)(raw, to_unit(xb), cost)
        updates, opt = tx.update(g, opt, raw)
        return (optax.apply_updates(raw, updates), opt, cost), (acc, reg)

    ones = jnp.ones((c,), jnp.float32)
    zeros = jnp.zeros((c,), jnp.int32)
    false = jnp.zeros((c,), bool)
    carry0 = dict(e=jnp.int32(0), raw=raw, opt=tx.init(raw), cost=ones * config.init_cost,
                  up=zeros, down=zeros, up_flag=false, down_flag=false,
                  best_mask=squash(raw["mask"]), best_pattern=squash(raw["pattern"]),
                  reg_best=ones * jnp.inf, es_count=zeros, es_best=ones * jnp.inf,
                  stopped=false, ran=zeros)

    def epoch(s):
        e = s["e"]
        k_perm, k_steps = jax.random.split(jax.random.fold_in(key, e))
        idx = _re_batches(k_perm, n, config)
        (raw, opt, _), (accs, regs) = jax.lax.scan(
            step, (s["raw"], s["opt"], s["cost"]),
            (idx, jax.random.split(k_steps, idx.shape[0])))
        acc, reg = jnp.mean(accs, 0), jnp.mean(regs, 0)
        live = ~s["stopped"]
        success = acc >= config.success_threshold
        better = live & success & (reg < s["reg_best"])
        take = better | (live & (e == 0))  # the first epoch's trigger until one succeeds
        reg_best = jnp.where(better, reg, s["reg_best"])
        if config.early_stop:
            stale = reg_best >= config.early_stop_threshold * s["es_best"]
            count = jnp.where(reg_best < jnp.inf, jnp.where(stale, s["es_count"] + 1, 0),
                              s["es_count"])
            es_count = jnp.where(live, count, s["es_count"])
            es_best = jnp.where(live, jnp.minimum(s["es_best"], reg_best), s["es_best"])
            stop = (live & s["up_flag"] & s["down_flag"]
                    & (es_count >= config.early_stop_patience))
        else:
            es_count, es_best, stop = s["es_count"], s["es_best"], false
        go = live & ~stop  # the cost moves only in epochs that do not stop
        up = jnp.where(success, s["up"] + 1, 0)
        down = jnp.where(success, 0, s["down"] + 1)
        raise_ = up >= config.patience
        lower = ~raise_ & (down >= config.patience)
        cost = jnp.where(raise_, s["cost"] * config.cost_multiplier,
                         jnp.where(lower, s["cost"] / config.cost_multiplier ** 1.5,
                                   s["cost"]))
        pick = lambda new, old: jnp.where(go, new, old)
        sel = lambda m: m.reshape(-1, *([1] * 3))
        return dict(
            e=e + 1, raw=raw, opt=opt, cost=pick(cost, s["cost"]),
            up=pick(jnp.where(raise_, 0, up), s["up"]),
            down=pick(jnp.where(lower, 0, down), s["down"]),
            up_flag=s["up_flag"] | (go & raise_), down_flag=s["down_flag"] | (go & lower),
            best_mask=jnp.where(sel(take), squash(raw["mask"]), s["best_mask"]),
            best_pattern=jnp.where(sel(take), squash(raw["pattern"]), s["best_pattern"]),
            reg_best=reg_best, es_count=es_count, es_best=es_best,
            stopped=s["stopped"] | stop, ran=s["ran"] + live)

    s = jax.lax.while_loop(lambda s: (s["e"] < config.nc_epochs) & ~jnp.all(s["stopped"]),
                           epoch, carry0)
    return dict(mask=s["best_mask"], pattern=s["best_pattern"],
                l1_norm=jnp.sum(s["best_mask"], axis=(1, 2, 3)),
                reached=s["reg_best"] < jnp.inf, re_epochs=s["ran"])


def _re_batches(key, n: int, config: NCConfig):
    """``[steps, batch]`` image indices of one reverse-engineering epoch."""
    bs = min(config.nc_batch_size or config.batch_size, n)
    if not config.nc_batches:
        return batch_indices(key, n, bs)
    keys = jax.random.split(key, config.nc_batches)
    return jax.vmap(lambda k: jax.random.permutation(k, n)[:bs])(keys)


def reverse_engineer(model: Model, state: State, x, config: NCConfig, key):
    """Every class's reversed trigger: a dict of arrays with a leading class axis
    (``mask`` [C, H, W, 1], ``pattern`` [C, H, W, ch], ``l1_norm``, ``reached``,
    ``re_epochs``), ``class_chunk`` classes at a time."""
    num = model.num_classes
    chunk = config.class_chunk if 0 < config.class_chunk < num else num
    if chunk == num:
        return _reverse(model, state, x, config, key, jnp.arange(num))
    groups = -(-num // chunk)
    targets = jnp.minimum(jnp.arange(groups * chunk), num - 1).reshape(groups, chunk)
    out = jax.lax.map(lambda t: _reverse(model, state, x, config, key, t), targets)
    return jax.tree_util.tree_map(lambda a: a.reshape(groups * chunk, *a.shape[2:])[:num], out)


def _lr(config: NCConfig, count, steps):
    """The fine-tuning rate at optimizer step ``count`` with ``steps`` (traced) per
    epoch: PyTorch's ``CosineAnnealingLR`` per epoch or batch, or constant."""
    if config.schedule == "constant":
        return jnp.float32(config.lr)
    steps = jnp.maximum(steps, 1)
    per_epoch = config.schedule_unit == "epoch"
    u = count // steps if per_epoch else count
    period = config.t_max or (config.epochs if per_epoch else config.epochs * steps)
    return config.lr * 0.5 * (1 + jnp.cos(jnp.pi * u / jnp.maximum(period, 1)))


def unlearn(model: Model, state: State, x, y, triggers: dict, flagged, config: NCConfig,
            key):
    """Fine-tunes on the defender's images with each flagged class's trigger stamped on
    the same ``unlearning_ratio`` of them (true labels); returns (state, loss per epoch,
    whether it fine-tuned). Without a flagged class (or with ``unlearn=False``) no step
    runs and ``state`` comes back as it was."""
    n, num = x.shape[0], flagged.shape[0]
    n_clean = int(n * (1 - config.unlearning_ratio))
    n_un = n - n_clean
    k_split, k_ft = jax.random.split(key)
    perm = jax.random.permutation(k_split, n)
    # Entries: the clean images, then the stamped ones once per class; only the flagged
    # classes' copies are in the set (static shapes: the rest are never drawn).
    src = jnp.concatenate([perm[:n_clean], jnp.tile(perm[n_clean:], num)])
    cls = jnp.concatenate([jnp.full((n_clean,), -1, jnp.int32),
                           jnp.repeat(jnp.arange(num, dtype=jnp.int32), n_un)])
    valid = (cls < 0) | flagged[jnp.maximum(cls, 0)]
    n_valid = jnp.sum(valid)
    run = jnp.any(flagged) & config.unlearn
    bs = min(config.batch_size, n)
    steps = jnp.where(run, (n_valid + bs - 1) // bs, 0)
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(lambda count: _lr(config, count, steps),
                               momentum=config.momentum or None))
    opts = StepOptions(augment=config.augment, flip=config.flip,
                       label_smoothing=config.label_smoothing)

    def batch(s, order):
        ent = order[(s * bs + jnp.arange(bs)) % jnp.maximum(n_valid, 1)]
        xb, cb = x[src[ent]], cls[ent]
        ci = jnp.maximum(cb, 0)
        stamped = stamp(xb, triggers["mask"][ci], triggers["pattern"][ci])
        return jnp.where((cb >= 0)[:, None, None, None], stamped, xb), y[src[ent]]

    def epoch(e, c):
        st, os_, losses = c
        k_perm, k_steps = jax.random.split(jax.random.fold_in(k_ft, e))
        # The set's entries first, in random order; batches wrap around like batch_indices.
        order = jnp.argsort(jnp.where(valid, jax.random.uniform(k_perm, valid.shape), 2.0))

        def body(b):
            s, st, os_, total = b
            xb, yb = batch(s, order)
            st, os_, loss, _ = train_step(model, tx, opts, st, os_, xb, yb,
                                          jax.random.fold_in(k_steps, s))
            return s + 1, st, os_, total + loss

        _, st, os_, total = jax.lax.while_loop(lambda b: b[0] < steps, body,
                                               (jnp.int32(0), st, os_, jnp.float32(0)))
        loss = jnp.where(steps > 0, total / jnp.maximum(steps, 1), jnp.nan)
        return st, os_, losses.at[e].set(loss)

    losses = jnp.full((config.epochs,), jnp.nan, jnp.float32)
    tuned, _, losses = jax.lax.fori_loop(0, config.epochs, epoch,
                                         (state, tx.init(state["params"]), losses))
    out = jax.tree_util.tree_map(lambda a, b: jnp.where(run, a, b), tuned, state)
    return out, losses, run


def defend(model: Model, state: State, data: DefenseData, config: NCConfig, key: jax.Array):
    """NC for one trial; returns (state, report).

    Report: per class ``l1_norm`` (of the best mask), ``anomaly_index``, ``flagged``
    (bool), ``reached`` (the success threshold was met in some epoch) and ``re_epochs``
    (reverse-engineering epochs run); ``finetuned`` (bool) and ``train_loss`` per
    fine-tuning epoch (NaN when nothing was flagged).
    """
    x, y = data.x_train, data.y_train
    k_re, k_ft = jax.random.split(key)
    rev = reverse_engineer(model, state, x, config, k_re)
    index, flagged = flag(rev["l1_norm"], config)
    out, losses, tuned = unlearn(model, state, x, y, rev, flagged, config, k_ft)
    report = dict(l1_norm=rev["l1_norm"], anomaly_index=index, flagged=flagged,
                  reached=rev["reached"], re_epochs=rev["re_epochs"], finetuned=tuned,
                  train_loss=losses)
    return out, report
