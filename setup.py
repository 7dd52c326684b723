"""Packages: every ``mimscale*`` package, plus ``recipes/`` shipped as ``mimscale.recipes``.

pyproject.toml cannot combine package discovery with a folder mapped from outside the package
tree, so this one call does it; everything else lives in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mimscale*"]), "mimscale.recipes"],
    package_dir={"mimscale.recipes": "recipes"},
)
