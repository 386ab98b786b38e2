"""The check every defense must pass; each defense's test module calls it.

``assert_vmap_matches_sequential``: T trials (default 2) in one ``jit(vmap(defend))`` give the same
ACC/ASR/RA (within 1e-5) as T separate one-trial runs, and the defense compiles once per
setting: a second vmapped run on other trials' data (same shapes) traces and compiles
nothing (a trace counter, as ``chex.assert_max_traces`` but per call of this check, since
variants such as lp/fe_tuning share one ``defend``: one trace for the vmapped program,
one for the one-trial program of the separate runs).

With ``attack`` (the checkpoint's attack) both vmapped runs go through
``experiment.defend`` on the same trials, with the real test set and with one of NaN
images, and the defended states must be equal (:func:`assert_ignores_test_set`): the
check that no defense reads the test set, at no extra compile.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import experiment


def _keys(trials):
    return jnp.stack([jax.random.fold_in(experiment.trial_key(0, t), 1) for t in trials])


def _split(dataset, trials, spc, trigger, validation):
    split = experiment.split_for_trials(dataset, trials, 0, spc=spc, validation=validation)
    return dataclasses.replace(split, trigger=trigger) if trigger is not None else split


def assert_vmap_matches_sequential(model, state, defense, dataset, test, *, spc=10,
                                   trials=(0, 1), trigger=None, atol=1e-5, attack=None):
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return defense.defend(*args, **kwargs)

    traced = dataclasses.replace(defense, defend=counted)
    val = defense.uses_validation
    if attack is None:
        together = experiment.run_defense(model, state, traced,
                                          _split(dataset, trials, spc, trigger, val),
                                          _keys(trials))
        others = tuple(t + len(trials) for t in trials)
        again = experiment.run_defense(model, state, traced,
                                       _split(dataset, others, spc, trigger, val), _keys(others))
    else:  # `bdjax defend`'s path (its splits and keys are _split's and _keys'), with the
        # real and then a NaN test set: the second run compiles nothing
        together, again = assert_ignores_test_set(model, state, attack, traced, dataset, test,
                                                  spc=spc, trials=trials)
    assert together.seconds_compile > 0 and again.seconds_compile == 0
    assert len(traces) == 1, f"{len(traces)} traces for one vmapped setting"
    leaves = jax.tree_util.tree_leaves(again.states)
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
    scores = experiment.evaluate_trials(model, together.states, test)
    for i, t in enumerate(trials):
        alone = experiment.run_defense(model, state, traced,
                                       _split(dataset, (t,), spc, trigger, val), _keys((t,)),
                                       strategy="sequential")
        one = experiment.evaluate_trials(model, alone.states, test)
        for k in ("acc", "asr", "ra"):
            assert abs(float(one[k][0]) - float(scores[k][i])) <= atol, (k, t, one, scores)
    assert len(traces) == 2, f"{len(traces)} traces: the one-trial program was traced again"
    return together, scores


def small_cnn_defense(name, **over):
    """The defense with ``over`` on the reference settings, for the small CNN on the
    synthetic data (no flips)."""
    from bdjax import defenses

    return defenses.for_run(name, over, dataset="synthetic", model="small_cnn", flip=False)


def run_trials(model, state, defense, dataset, trials=(0, 1), spc=100):
    """``defense`` vmapped over ``trials`` (trial t's key: ``key(t)``) at ``spc``."""
    split = experiment.split_for_trials(dataset, trials, 0, spc=spc,
                                        validation=defense.uses_validation)
    return experiment.run_defense(model, state, defense, split,
                                  jnp.stack([jax.random.key(t) for t in trials]))


def shipped(name, **extra):
    """The defense as `bdjax defend` runs it on the synthetic data with the shipped
    config (configs/synthetic.py), plus ``extra`` settings."""
    from bdjax import config, defenses

    overrides = {**config.load(None, dataset="synthetic")["defenses"].get(name, {}), **extra}
    return defenses.for_run(name, overrides, dataset="synthetic", model="small_cnn",
                            flip=False)


def assert_halves_asr(model, state, defense, dataset, test, *, spc=100, trials=(0, 1),
                      trigger=None, max_acc_drop=0.10):
    """Issue 8's bar on the test fixture: over ``trials`` at ``spc``, the mean ASR is at
    most half of the ASR before and the mean clean accuracy drops by less than
    ``max_acc_drop``. Returns the run and the per-trial scores after."""
    split = _split(dataset, trials, spc, trigger, defense.uses_validation)
    run = experiment.run_defense(model, state, defense, split, _keys(trials))
    before = experiment.evaluate(model, state, test)
    after = experiment.evaluate_trials(model, run.states, test)
    print(f"{defense.name}: ACC {before['acc']:.3f} -> "
          f"{'/'.join(f'{a:.3f}' for a in after['acc'])}, ASR {before['asr']:.3f} -> "
          f"{'/'.join(f'{a:.3f}' for a in after['asr'])}")  # shown with pytest -s
    assert after["asr"].mean() <= before["asr"] / 2, (defense.settings, before, after)
    assert before["acc"] - after["acc"].mean() < max_acc_drop, (defense.settings, before, after)
    return run, after



def _nan_test_set(dataset):
    """``dataset`` with every test image NaN (float32) and every test label -1, and the
    matching test set."""
    from bdjax.attacks import TestSet

    nan_x = np.full(dataset.x_test.shape, np.nan, np.float32)
    nan_y = np.full(dataset.y_test.shape, -1, np.int32)
    nan_ds = copy.copy(dataset)  # past Dataset's uint8 check: a NaN set is not valid data
    object.__setattr__(nan_ds, "x_test", nan_x)
    object.__setattr__(nan_ds, "y_test", nan_y)
    return (nan_ds,
            TestSet(x_clean=nan_x, y=nan_y, x_poisoned=nan_x, y_target=nan_y,
                    valid=np.ones(nan_y.shape, bool)))


def defend_runs(model, state, attack, defense, dataset, test, *, spc, trials):
    """The runs ``experiment.defend`` (what ``bdjax defend`` runs) makes for a checkpoint
    of ``dataset`` with test set ``test``, caught at the runner."""
    caught = []
    real_run = experiment.run_defense

    def catching(*args, **kwargs):
        caught.append(real_run(*args, **kwargs))
        return caught[-1]

    bd = experiment.Backdoored("fixture", model, state, {"poison_ratio": 0.1}, dataset,
                               attack, test)
    experiment.run_defense = catching
    try:
        experiment.defend(bd, defense, spc=spc, trials=trials, seed=0, log=lambda m: None)
    finally:
        experiment.run_defense = real_run
    return caught


def assert_ignores_test_set(model, state, attack, defense, dataset, test, *, spc, trials):
    """No defense reads the test set: ``experiment.defend`` on a checkpoint whose test
    images are all NaN (float32, labels -1) returns exactly the defended states it
    returns with the real test set. Returns the two runs (real, NaN)."""
    nan_ds, nan_test = _nan_test_set(dataset)
    (real,) = defend_runs(model, state, attack, defense, dataset, test, spc=spc, trials=trials)
    (nan,) = defend_runs(model, state, attack, defense, nan_ds, nan_test, spc=spc,
                         trials=trials)
    a, b = (jax.tree_util.tree_map(np.asarray, r.states) for r in (real, nan))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    return real, nan
