"""Packages: every ``mimscale*`` package, plus ``recipes/`` shipped as ``mimscale.recipes`` (and
the sweep specs in ``mimscale/scaling/specs``, the paper reference table ``references.csv``).

pyproject.toml cannot combine package discovery with a folder mapped from outside the package
tree, so this one call does it; everything else lives in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# recipes/ and each of its method folders (data-only packages holding the YAML files)
RECIPES = [
    "mimscale.recipes",
    *(f"mimscale.recipes.{d.name}" for d in sorted((ROOT / "recipes").iterdir()) if d.is_dir()),
]

setup(
    packages=[*find_packages(include=["mimscale*"]), *RECIPES],
    package_dir={"mimscale.recipes": "recipes"},
    package_data={
        **{name: ["*.yaml"] for name in RECIPES},
        "mimscale.scaling": ["specs/*.yaml", "references.csv"],
    },
)
