"""Intermediate outputs of a forward pass, captured by module name.

Defenses that compare inner representations (NAD's attention maps) need a stage's
output and the logits from ONE forward pass, so the gradient flows through both and
BatchNorm sees the batch once. :func:`apply_capturing` runs :meth:`Model.apply` with a
flax method interceptor that records the outputs of the named modules; it works under
``jit``, ``vmap`` and ``grad`` (the interception happens while tracing).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bdjax.kernels.bn import module_name
from bdjax.models import Model, State


def apply_capturing(model: Model, state: State, x, names: tuple[str, ...], *,
                    train: bool = False, key: jax.Array | None = None):
    """``(model.apply(state, x, ...), {name: output})`` for the modules ``names``
    (paths such as ``bn3`` or ``layer3_1``, as in ``ModelSpec.stages``).

    Raises KeyError naming the missing module when one of ``names`` never ran.
    """
    sink: dict[str, jax.Array] = {}

    def spy(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            name = module_name(context.module)
            if name in names:
                sink[name] = out
        return out

    with nn.intercept_methods(spy):
        out = model.apply(state, x, train=train, key=key)
    missing = [n for n in names if n not in sink]
    if missing:
        raise KeyError(f"modules {missing} did not run in model {model.name!r}")
    return out, {n: sink[n] for n in names}


def stage_outputs(model: Model, state: State, x, *, train: bool = False,
                  key: jax.Array | None = None):
    """``(apply output, [stage outputs])`` for ``model.spec.stages`` in forward order,
    each after its ReLU where ``spec.stage_relu``."""
    spec = model.spec
    out, caught = apply_capturing(model, state, x, spec.stages, train=train, key=key)
    feats = [caught[n] for n in spec.stages]
    if spec.stage_relu:
        feats = [jax.nn.relu(f) for f in feats]
    return out, feats


__all__ = ["apply_capturing", "stage_outputs"]
