"""setup.py: everything is in pyproject.toml; this file exists for the optional CUDA extension,
which a later change adds. Today it installs the pure-Python package with or without CUDA."""

from setuptools import setup

setup()
