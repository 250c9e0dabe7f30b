"""Lets Dataflow stage this package for its workers: `--setup_file ./setup.py`.

All metadata lives in pyproject.toml; Beam runs `python setup.py sdist` on this file.
"""

from setuptools import setup

setup()
