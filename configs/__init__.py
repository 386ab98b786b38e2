"""bdjax's configs as code, shipped in the wheel as ``bdjax.configs``.

Each module defines ``get_config(smoke: bool = False) -> dict`` with any of:

- ``dataset_args``: arguments of ``bdjax.data.load`` (e.g. synthetic sizes);
- ``model``: the model ``bdjax attack`` trains when ``--model`` is not given;
- ``train``: attack-training settings (``bdjax.train.TrainConfig`` fields);
- ``attacks``: per attack, parameters of ``bdjax attack`` (``--param`` still wins), e.g.
  the lengths of an attack's resource generation;
- ``defenses``: per defense, setting overrides (``--set`` still wins);
- ``sweep``: a benchmark grid (datasets, models, attacks, ratios, defenses, spc...),
  for ``bdjax sweep``.

``<dataset>.py`` holds a dataset's defaults and is used when no ``--config`` is given;
other modules are chosen by name (``--config survey_cifar10``) or by path
(``--config my_settings.py``). See ``bdjax.config``.
"""
