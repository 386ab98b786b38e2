"""The trial runner: one defense over T trials as compiled programs, cached.

A defense is one pure function of one trial, ``defend(model, state, data, config,
key)``. The runner turns it into a program over T trials (leading axis of the data and
keys) in one of three layouts (``strategy``):

- ``vmap``: ``jit(vmap(defend))``, all trials in one call. With several local devices
  (GPUs, TPU cores, or ``--xla_force_host_platform_device_count`` CPU devices) the
  trials are spread over them with ``jax.shard_map`` over a ``trials`` mesh axis, vmap
  inside each device (T is padded to a multiple of the device count with copies of the
  last trial, whose results are dropped);
- ``map``: ``jit(lax.map(defend))``, the trials in sequence inside one program (the
  memory of one trial, no per-trial weights inside a convolution);
- ``sequential``: ``jit(defend)`` called once per trial (the reference the others are
  tested against).

Under ``vmap`` a convolution with per-trial weights becomes a grouped convolution,
which some backends run far below dense speed. ``conv_rule`` picks how convolutions
are batched (``models.layers.conv_rule``): ``native`` (the grouped convolution),
``fold`` (bdjax's rule: the trial axis folded into the batch or the output channels,
else one plain convolution per trial) or ``auto`` (``fold`` on CPU, native elsewhere);
``bdjax bench --layouts`` measures them side by side per model.

All layouts compute the same function of the same data and keys, but XLA compiles each
program separately, so floats can differ in the last bits; over a whole defense such a
difference can move a test image across the decision boundary (measured: a 3-trial
vmapped FT run gave one trial ASR 0.7494 where the sequential run gave 0.7500, one test
image).

Each program is compiled once per (model, defense setting, layout, devices, argument
shapes) and cached, so a sweep over many checkpoints of one model compiles each
defense setting once.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bdjax.data import DefenseData
from bdjax.defenses import Defense
from bdjax.errors import BdjaxError, check_choice
from bdjax.models import Model, State
from bdjax.models.layers import CONV_RULES, conv_rule as conv_rule_scope

STRATEGIES = ("vmap", "map", "sequential")


@dataclasses.dataclass
class TrialRun:
    """Output of :func:`run_defense`: per-trial states/reports (leading axis T), timing,
    and how the trials were laid out."""

    states: State
    reports: dict
    seconds_compile: float
    seconds_run: float
    strategy: str = "vmap"
    devices: int = 1
    conv_rule: str = "auto"


def _one_trial(defense: Defense, model: Model) -> Callable:
    return lambda state, d, key: defense.defend(model, state, d, defense.config, key)


# Compiled defenses, one per (model, defense with its settings, layout, devices, argument
# shapes). The least recently used executable is dropped beyond _MAX_COMPILED (each holds
# device code and, for big models, buffers), so a long sweep over many settings stays
# bounded.
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_MAX_COMPILED = 32


def _signature(*args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


def _program(fn: Callable, strategy: str, mesh: Mesh | None) -> Callable:
    if strategy == "sequential":
        return fn
    if strategy == "map":
        return lambda state, d, keys: jax.lax.map(lambda a: fn(state, *a), (d, keys))
    fn = jax.vmap(fn, in_axes=(None, 0, 0))
    if mesh is None:
        return fn
    trials = PartitionSpec("trials")
    # check_vma=False: bdjax's conv VJP (models/layers.py) returns weight gradients that
    # vary over the trial axis for weights the trials share at the start; the trials'
    # state is per trial inside vmap, so nothing is summed across devices.
    return jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(), trials, trials),
                         out_specs=trials, check_vma=False)


def _compiled(model: Model, defense: Defense, strategy: str, rule: str,
              mesh: Mesh | None, *args):
    """(executable, seconds spent compiling it now; 0 when it was cached)."""
    devices = None if mesh is None else tuple(d.id for d in mesh.devices.flat)
    key = (model, defense, strategy, rule, devices, _signature(*args))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    fn = _program(_one_trial(defense, model), strategy, mesh)
    t0 = time.perf_counter()
    with conv_rule_scope(rule):
        exe = jax.jit(fn).lower(*args).compile()
    _COMPILED[key] = exe
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return exe, time.perf_counter() - t0


def trial_mesh(devices: int | None = None) -> Mesh | None:
    """A 1-D ``trials`` mesh over the first ``devices`` local devices (default all);
    None for one device."""
    local = jax.local_devices()
    n = len(local) if devices is None else devices
    if not 1 <= n <= len(local):
        raise BdjaxError(f"devices {n} is invalid; accepted: 1 to {len(local)} (the local "
                         f"{local[0].platform} devices).")
    return None if n == 1 else Mesh(np.array(local[:n]), ("trials",))


def _pad_trials(tree, to: int):
    """Pads the leading (trial) axis to ``to`` with copies of the last trial."""
    def pad(a):
        extra = to - a.shape[0]
        return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, 0)])
    return jax.tree_util.tree_map(pad, tree)


def run_defense(model: Model, state: State, defense: Defense, split: DefenseData,
                keys: jax.Array, *, strategy: str = "vmap", conv_rule: str = "auto",
                devices: int | None = None) -> TrialRun:
    """Runs ``defense`` on every trial of ``split`` (leading axis T) from ``state``.

    ``strategy`` and ``conv_rule`` pick the layout (module docstring); ``devices`` how
    many local devices share a ``vmap`` run (default all of them). Compile and run time
    are measured apart (results are blocked on before reading clocks).
    """
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("conv_rule", conv_rule, CONV_RULES)
    split = jax.tree_util.tree_map(jnp.asarray, split)
    t = keys.shape[0]
    mesh = trial_mesh(devices) if strategy == "vmap" else None
    n_dev = 1 if mesh is None else mesh.size
    if strategy == "sequential":
        trial = lambda i: jax.tree_util.tree_map(lambda a: a[i], (split, keys))
        exe, seconds_compile = _compiled(model, defense, strategy, conv_rule, None, state,
                                         *trial(0))
        t1 = time.perf_counter()
        outs = [jax.block_until_ready(exe(state, *trial(i))) for i in range(t)]
        states, reports = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    else:
        padded = -(-t // n_dev) * n_dev
        args = (state, *_pad_trials((split, keys), padded))
        if mesh is not None:  # the state on every device, each device its trials
            args = (jax.device_put(args[0], NamedSharding(mesh, PartitionSpec())),
                    *jax.device_put(args[1:], NamedSharding(mesh, PartitionSpec("trials"))))
        exe, seconds_compile = _compiled(model, defense, strategy, conv_rule, mesh, *args)
        t1 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        states, reports = jax.tree_util.tree_map(lambda a: a[:t], out)
    return TrialRun(states, reports, seconds_compile=seconds_compile,
                    seconds_run=time.perf_counter() - t1, strategy=strategy, devices=n_dev,
                    conv_rule=conv_rule)


__all__ = ["STRATEGIES", "TrialRun", "run_defense", "trial_mesh"]
