"""Pure-Python install: never needs a compiler or a GPU (native backends build on first use)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastmask", "fastmask.*"]) + ["fastmask.kernels", "fastmask.bench"],
    package_dir={"fastmask.kernels": "kernels", "fastmask.bench": "bench"},
)
