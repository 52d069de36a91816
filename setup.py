"""Install fastmask. Pure Python by default: never needs a compiler or a GPU.

The cpp backend compiles on first use. To compile it now instead, install with
``FASTMASK_BUILD_EXT=1 pip install --no-build-isolation .`` (the build uses the
torch already installed; build isolation would fetch another one).
"""

import glob
import os

from setuptools import find_packages, setup

packages = find_packages(include=["fastmask", "fastmask.*"]) + ["fastmask.kernels", "fastmask.bench", "fastmask.csrc"]
package_dir = {"fastmask.kernels": "kernels", "fastmask.bench": "bench", "fastmask.csrc": "csrc"}
package_data = {"fastmask.csrc": ["*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cu", "cuda/*.cpp"]}
ext_modules, cmdclass = [], {}

if os.environ.get("FASTMASK_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "fastmask._cpp",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args=["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                                "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules, cmdclass=cmdclass)
