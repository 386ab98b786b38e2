"""The wheel ships every package, the configs included, and bdjax finds its configs
installed, from a wheel, or from a source tree on PYTHONPATH."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _declared_packages() -> set[str]:
    """[tool.setuptools] packages (read without tomllib, which Python 3.10 lacks)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^\[tool\.setuptools\]\s*\npackages\s*=\s*(\[[^\]]*\])", text, re.M)
    return set(ast.literal_eval(block.group(1)))


def test_every_package_of_the_tree_is_declared():
    """The package list is explicit (configs/ maps to bdjax.configs), so a new
    subpackage must be added to it; this test says which."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bdjax").rglob(
        "__init__.py")}
    assert found | {"bdjax.configs"} == _declared_packages()


def test_wheel_carries_the_configs_and_loads_them_outside_the_tree(tmp_path):
    out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = out.glob("bdjax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("__init__", "synthetic", "cifar10", "survey_cifar10"):
        assert f"bdjax/configs/{name}.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import bdjax.config as c, bdjax.configs\n"
            f"assert bdjax.configs.__file__.startswith({str(site)!r}), bdjax.configs.__file__\n"
            "print(c.load(None, dataset='synthetic')['train']['epochs'], c.names())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(site)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("20 ") and "survey_cifar10" in r.stdout


def test_source_tree_on_pythonpath_finds_configs(tmp_path):
    """PYTHONPATH=$PWD python3 -m bdjax (the lent GPU's way, no install): bdjax.configs is
    the repository's configs/ (python -S: no site packages, so no installed bdjax)."""
    code = ("import bdjax.config as c\n"
            "print(c.load('survey_cifar10')['defenses']['fst']['epochs'], c.names())\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("15 ") and "synthetic" in r.stdout
