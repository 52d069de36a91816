"""Pure-Python install: never needs a compiler or a GPU (native backends build on first use)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["fastmask", "fastmask.*"]))
