"""Build the C++ extension ddpm_fast._C (reverse_step): the CPU kernel always, the CUDA kernel when
torch has CUDA and CUDA_HOME is set (no visible GPU needed; TORCH_CUDA_ARCH_LIST is honoured,
default sm_90 for the H100).

A failed build is a warning and the package falls back to the PyTorch reference, unless
DDPM_FAST_REQUIRE_EXT=1 (CI and `make gpu-check` set it), where it is an error.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CSRC = HERE / "csrc"


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("ddpm_fast: torch is not importable; building without the C++ extension", file=sys.stderr)
        return [], {}

    sources = [str(p.relative_to(HERE)) for p in (CSRC / "bindings.cpp", CSRC / "reverse_step_cpu.cpp")
               if p.exists()]
    if len(sources) < 2:
        return [], {}
    # -fno-math-errno: sqrtf may then compile to a vector instruction; with errno semantics GCC keeps a
    # scalar libm call in the loop and the CPU reverse_step kernel's Box-Muller loop cannot vectorize.
    cxx = ["-O3", "-std=c++17", "-fno-math-errno"]
    if sys.platform.startswith("linux"):
        cxx += ["-fopenmp"]
    define_macros = []
    cu = CSRC / "reverse_step_cuda.cu"
    use_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and cu.exists()
                and os.environ.get("DDPM_FAST_NO_CUDA", "0") != "1")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources.append(str(cu.relative_to(HERE)))
        define_macros.append(("DDPM_FAST_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "ddpm_fast._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [])
    else:
        ext = cpp_extension.CppExtension(
            "ddpm_fast._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [])

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if os.environ.get("DDPM_FAST_REQUIRE_EXT", "0") == "1":
                    raise
                print(f"ddpm_fast: WARNING: the C++ extension failed to build ({e}); the package will "
                      "use the PyTorch reference for reverse_step", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
