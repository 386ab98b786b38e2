"""bdjax: backdoor attacks and defenses for image classifiers in JAX/Flax.

Public surface: ``bdjax.data``, ``bdjax.models``, ``bdjax.attacks``, ``bdjax.defenses``,
``bdjax.train``, ``bdjax.metrics``, ``bdjax.checkpoint``, ``bdjax.experiment``.
"""

__version__ = "0.1.0"
