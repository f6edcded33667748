"""Build the C++ extension ddpm_fast._C (reverse_step, and the CPU kernels of groupnorm_swish and
residual_add): the CPU kernels always, the CUDA kernel when torch has CUDA and CUDA_HOME is set (no
visible GPU needed; TORCH_CUDA_ARCH_LIST is honoured, default sm_90 for the H100).

OpenMP: used when the C++ compiler accepts -fopenmp (probed); without it the extension still builds
and its kernels run single-threaded (a warning says so). DDPM_FAST_NO_OPENMP=1 skips the probe and
builds that way on purpose (to check the no-OpenMP build on a machine that has OpenMP).

A failed build is a warning and the package falls back to the PyTorch reference, unless
DDPM_FAST_REQUIRE_EXT=1 (CI and `make gpu-check` set it), where it is an error.
"""
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
CSRC = HERE / "csrc"
CPU_SOURCES = ("bindings.cpp", "reverse_step_cpu.cpp", "groupnorm_swish_cpu.cpp", "residual_add_cpu.cpp",
               "attention_core_cpu.cpp")
_OMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def openmp_flags(cxx=None) -> list:
    """["-fopenmp"] when the C++ compiler (CXX, default c++) compiles and links an OpenMP program;
    otherwise [] and a warning: at::parallel_for then runs each kernel on one thread."""
    cxx = cxx or os.environ.get("CXX", "c++")
    if os.environ.get("DDPM_FAST_NO_OPENMP", "0") == "1":
        print("ddpm_fast: WARNING: DDPM_FAST_NO_OPENMP=1: building without OpenMP; the CPU kernels will run "
              "single-threaded", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp_probe.cpp"
        src.write_text(_OMP_PROBE)
        try:
            ok = subprocess.run([*shlex.split(cxx), "-fopenmp", str(src), "-o", str(Path(tmp) / "omp_probe")],
                                capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
    if ok:
        return ["-fopenmp"]
    print(f"ddpm_fast: WARNING: the C++ compiler ({cxx}) has no usable OpenMP (-fopenmp); the CPU kernels "
          "will run single-threaded", file=sys.stderr)
    return []


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("ddpm_fast: torch is not importable; building without the C++ extension", file=sys.stderr)
        return [], {}

    sources = [str((CSRC / name).relative_to(HERE)) for name in CPU_SOURCES if (CSRC / name).exists()]
    if len(sources) < len(CPU_SOURCES):
        return [], {}
    # -fno-math-errno: sqrtf may then compile to a vector instruction; with errno semantics GCC keeps a
    # scalar libm call in the loop and the CPU reverse_step kernel's Box-Muller loop cannot vectorize.
    # -fno-trapping-math: lets GCC if-convert the clamps in the fused kernels' exp (csrc/cpu_math.h)
    # into vector blends; with it on, the Swish loops stay scalar (~10x slower). Rounding is unchanged.
    omp = openmp_flags()
    cxx = ["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"] + omp
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
            extra_link_args=omp)
    else:
        ext = cpp_extension.CppExtension(
            "ddpm_fast._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx},
            extra_link_args=omp)

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if os.environ.get("DDPM_FAST_REQUIRE_EXT", "0") == "1":
                    raise
                print(f"ddpm_fast: WARNING: the C++ extension failed to build ({e}); the package will "
                      "use the PyTorch reference for reverse_step and the fused ops' CPU kernels", file=sys.stderr)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip's build backend and `python setup.py` run it as __main__; tests import it
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
