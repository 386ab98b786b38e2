"""Checks every defense must pass; each defense's test module calls them.

- ``assert_vmap_matches_sequential``: T trials in one ``jit(vmap(defend))`` give the same
  ACC/ASR/RA (within 1e-5) as T separate one-trial runs.
- ``assert_compiles_once``: two runs of the same setting on different trial data trace
  the defense once (``chex.assert_max_traces``) and the second run compiles nothing.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from bdjax import experiment


def _keys(trials):
    return jnp.stack([jax.random.fold_in(experiment.trial_key(0, t), 1) for t in trials])


def _split(dataset, trials, spc, trigger):
    split = experiment.split_for_trials(dataset, trials, 0, spc=spc)
    return dataclasses.replace(split, trigger=trigger) if trigger is not None else split


def assert_vmap_matches_sequential(model, state, defense, dataset, test, *, spc=10,
                                   trials=(0, 1, 2), trigger=None, atol=1e-5):
    together = experiment.run_defense(model, state, defense, _split(dataset, trials, spc, trigger),
                                      _keys(trials))
    scores = experiment.evaluate_trials(model, together.states, test)
    for i, t in enumerate(trials):
        alone = experiment.run_defense(model, state, defense,
                                       _split(dataset, (t,), spc, trigger), _keys((t,)),
                                       strategy="sequential")
        one = experiment.evaluate_trials(model, alone.states, test)
        for k in ("acc", "asr", "ra"):
            assert abs(float(one[k][0]) - float(scores[k][i])) <= atol, (k, t, one, scores)
    return together, scores


def assert_compiles_once(model, state, defense, dataset, *, spc=10, trigger=None):
    traced = dataclasses.replace(defense, defend=chex.assert_max_traces(defense.defend, n=1))
    first = experiment.run_defense(model, state, traced, _split(dataset, (0, 1), spc, trigger),
                                   _keys((0, 1)))
    second = experiment.run_defense(model, state, traced, _split(dataset, (2, 3), spc, trigger),
                                    _keys((2, 3)))
    assert first.seconds_compile > 0 and second.seconds_compile == 0
    leaves = jax.tree_util.tree_leaves(second.states)
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
