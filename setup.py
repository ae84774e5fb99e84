"""Build the optional fast-scan extension (C++17, pybind11) once per instruction set.

``tqindex.kernels._fastscan_generic`` (portable), ``_fastscan_avx2`` and ``_fastscan_avx512``
(x86-64) come from the same sources with different flags; ``tqindex/kernels/fastscan.py``
imports the best one the CPU runs. Every extension is optional: where one fails to build (no
compiler, an old one), the package installs without it and searches with the numba/torch kernels.
"""

import os
import platform
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

DEPENDS = [f"tqindex/kernels/csrc/{name}" for name in ("exact.h", "module.cpp", "plan.h", "pool.h", "scan.h", "simd.h")]
VARIANTS = {"generic": ([], [])}
if platform.machine().lower() in ("x86_64", "amd64"):
    VARIANTS["avx2"] = (["-mavx2", "-mfma", "-mbmi2"], [("TQ_ISA_AVX2", "1")])
    VARIANTS["avx512"] = (["-mavx2", "-mfma", "-mbmi2", "-mavx512f", "-mavx512bw"], [("TQ_ISA_AVX512", "1")])


def _extension(isa: str, flags: list[str], macros: list[tuple[str, str]]) -> Pybind11Extension:
    name = f"_fastscan_{isa}"
    extension = Pybind11Extension(
        f"tqindex.kernels.{name}",
        [f"tqindex/kernels/csrc/fastscan_{isa}.cpp"],  # one source per build: objects never collide
        depends=DEPENDS,
        cxx_std=17,
        define_macros=[("TQ_MODULE_NAME", name), *macros],
        # no fused multiply-adds where the source has none: every build computes the same tables
        extra_compile_args=["-O3", "-ffp-contract=off", *flags],
    )
    extension.optional = True  # a failed build is a warning; the pure-Python kernels remain
    return extension


def _has_openmp(compiler) -> bool:
    """True when the compiler builds and links a shared object with -fopenmp."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint threads() { int n = 0;\n#pragma omp parallel\n n = omp_get_num_threads();\n return n; }\n")
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_shared_object(objects, os.path.join(tmp, "omp.so"), extra_postargs=["-fopenmp"])
        except Exception:  # distutils' CompileError / LinkError, or no compiler at all
            return False
    return True


class BuildExt(build_ext):
    """pybind11's build_ext, with OpenMP where the compiler has it: the kernels' threads are then
    the team of torch's OpenMP runtime (csrc/pool.h); without it, a pool of std::threads."""

    def build_extensions(self) -> None:
        if _has_openmp(self.compiler):
            for extension in self.extensions:
                extension.extra_compile_args.append("-fopenmp")
                extension.extra_link_args.append("-fopenmp")
        super().build_extensions()


setup(
    ext_modules=[_extension(isa, *spec) for isa, spec in VARIANTS.items()],
    cmdclass={"build_ext": BuildExt},
)
