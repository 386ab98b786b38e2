"""Configs as code: ``configs/<dataset>.py`` files with ``get_config(smoke) -> dict``.

A config gives per-dataset defaults (``dataset_args``, ``train`` for attack training,
``defenses`` overrides per defense); command-line flags override it. Values not given
anywhere fall back to the REFERENCE.md defaults in the dataclasses.
"""

from __future__ import annotations

import importlib.util
import pathlib

from bdjax.errors import BdjaxError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
EMPTY = {"dataset_args": {}, "train": {}, "defenses": {}}


def load(name_or_path: str | None, *, dataset: str, smoke: bool = False) -> dict:
    """The config ``name_or_path`` (a file), else ``configs/<dataset>.py``, else empty."""
    if name_or_path:
        path = pathlib.Path(name_or_path)
        if not path.is_file():
            raise BdjaxError(f"config {name_or_path!r} does not exist; accepted: a Python file "
                             "defining get_config(smoke), e.g. configs/synthetic.py.")
    else:
        path = CONFIG_DIR / f"{dataset}.py"
        if not path.is_file():
            return {k: dict(v) for k, v in EMPTY.items()}
    spec = importlib.util.spec_from_file_location(f"bdjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        cfg = module.get_config(smoke)
    except Exception as e:  # a config is user code: report it in one sentence
        raise BdjaxError(f"config {str(path)!r} failed to load ({type(e).__name__}: {e}); "
                         "accepted: a file defining get_config(smoke) -> dict.") from e
    return {k: dict(cfg.get(k, {})) for k in EMPTY}
