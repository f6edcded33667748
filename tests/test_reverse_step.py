"""ddpm_fast::reverse_step (C++/CUDA extension) against the spec, reference.functional.reverse_step.

Covers every sampler variant's coefficient table, every dtype pair, sizes 1 / 7 / 2^20 + 3, strided and
channels_last layouts, injected and in-kernel (Philox) noise, the in-place form, the binding's input
checks, opcheck, the no-extension fallback, and that the CUDA sources compile here. GPU-only tests
(`gpu` marker) compare the CUDA kernel with the CPU kernel and replay it inside a CUDA graph.
"""
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ddpm_fast.config import DiffusionConfig
from ddpm_fast.reference import functional as F
from ddpm_fast.reference.diffusion import Schedule
from helpers import poison
from tolerances import tol

rs = importlib.import_module("ddpm_fast.ops.reverse_step")  # the package re-exports the function
ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()

SCHED = Schedule(DiffusionConfig())
FULL = SCHED.timesteps(SCHED.n_steps)
STRIDED = SCHED.timesteps(50)
# name -> (coefficient table, clip range)
VARIANTS = {
    "labml": (SCHED.ddpm_coeffs(FULL, "labml"), None),
    "paper": (SCHED.ddpm_coeffs(FULL, "paper"), None),
    "posterior": (SCHED.ddpm_coeffs(FULL, "posterior"), None),
    "paper_clipped": (SCHED.ddpm_coeffs_clipped(FULL, "paper"), (-1.0, 1.0)),
    "strided_posterior": (SCHED.ddpm_coeffs(STRIDED, "posterior"), None),
    "ddim_eta0": (SCHED.ddim_coeffs(STRIDED, 0.0), None),
    "ddim_eta0.5": (SCHED.ddim_coeffs(STRIDED, 0.5), None),
    "ddim_eta1": (SCHED.ddim_coeffs(STRIDED, 1.0), None),
    "ddim_eta0_clipped": (SCHED.ddim_coeffs(STRIDED, 0.0), (-1.0, 1.0)),
}
# (x_t dtype, eps dtype): x_t in fp32 with any eps, or both in one low precision
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
          (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]
DTYPE_IDS = ["x32-e32", "x32-e16", "x32-bf16", "x16-e16", "bf16-bf16"]
# presets' image shapes plus odd ones (C = 96, 7 x 9, batch 1 and 3)
SHAPES = {"cifar-b3": (3, 3, 32, 32), "tiny-b1": (1, 3, 16, 16), "digits-b2": (2, 1, 16, 16), "odd": (3, 96, 7, 9)}


def _tol(x_dtype, eps_dtype):
    if x_dtype != torch.float32:
        return tol("reverse_step_lowp_state", x_dtype)
    return tol("reverse_step", eps_dtype)


def _inputs(shape, x_dtype=torch.float32, eps_dtype=torch.float32, device="cpu"):
    x = torch.randn(shape).to(device=device, dtype=x_dtype)
    eps = torch.randn(shape).to(device=device, dtype=eps_dtype)
    return x, eps


def _rows(coeffs):
    s = coeffs.shape[0]
    return sorted({0, s // 2, s - 1})  # first (t = T-1, largest x0 gain), middle, last (t = 0)


def no_ext_ok(fn):
    """Marks a test that is meaningful without the compiled extension (fallback, compile checks)."""
    fn.no_ext_ok = True
    return fn


@pytest.fixture(autouse=True)
def _require_extension(request):
    # A missing extension is a broken build here, so kernel tests fail loudly rather than skip.
    if getattr(request.function, "no_ext_ok", False):
        yield
        return
    if not rs.HAS_EXTENSION:
        pytest.fail(f"ddpm_fast._C did not load ({rs._LOAD_ERROR}); build it with "
                    "`pip install --no-build-isolation -e .`")
    yield


# --- CPU kernel vs the reference ------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_injected_noise(variant, dtypes):
    coeffs, clip = VARIANTS[variant]
    x, eps = _inputs(SHAPES["cifar-b3"], *dtypes)
    z = torch.randn(x.shape)
    for row in _rows(coeffs):
        step = torch.tensor(row)
        got = rs.reverse_step(x, eps, step, coeffs, noise=z, clip=clip)
        want = F.reverse_step(x, eps, step, coeffs, noise=z, clip=clip)
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got, want, **_tol(*dtypes))


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_generated_noise(variant, dtypes):
    coeffs, clip = VARIANTS[variant]
    x, eps = _inputs(SHAPES["odd"], *dtypes)
    for row in _rows(coeffs):
        step = torch.tensor(row)
        got = rs.reverse_step(x, eps, step, coeffs, seed=1234, clip=clip)
        want = F.reverse_step(x, eps, step, coeffs, seed=1234, clip=clip)
        torch.testing.assert_close(got, want, **_tol(*dtypes))


def test_last_step_noise_is_a_table_entry():
    # paper/posterior: sigma = 0 at t = 0 -> the output does not depend on the noise; labml: it does.
    x, eps = _inputs((2, 3, 16, 16))
    last = torch.tensor(FULL.numel() - 1)
    for variant, noisy in (("paper", False), ("posterior", False), ("labml", True)):
        coeffs = VARIANTS[variant][0]
        a = rs.reverse_step(x, eps, last, coeffs, seed=1)
        b = rs.reverse_step(x, eps, last, coeffs, seed=2)
        assert (not torch.equal(a, b)) == noisy, variant


@pytest.mark.parametrize("variant", ["paper_clipped", "ddim_eta0_clipped"])
def test_clip_engages(variant):
    coeffs, clip = VARIANTS[variant]
    x, eps = _inputs((2, 3, 32, 32))
    step = torch.tensor(0)  # t = T-1: x0 = (x - sqrt(1-ab) eps) / sqrt(ab) is far outside [-1, 1]
    row = coeffs[0]
    x0 = row[0] * x + row[1] * eps
    assert (x0.abs() > 1).float().mean() > 0.5  # the clamp has work to do, so the comparison can fail
    z = torch.randn(x.shape)
    clipped = rs.reverse_step(x, eps, step, coeffs, noise=z, clip=clip)
    unclipped = rs.reverse_step(x, eps, step, coeffs, noise=z)
    assert not torch.allclose(clipped, unclipped)
    torch.testing.assert_close(clipped, F.reverse_step(x, eps, step, coeffs, noise=z, clip=clip),
                               **tol("reverse_step", torch.float32))


@pytest.mark.parametrize("numel", [1, 7, 2 ** 20 + 3], ids=["n1", "n7", "n2^20+3"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_sizes(numel, dtypes):
    # Odd sizes exercise partial chunks and partial Philox blocks; every element is compared.
    coeffs, _ = VARIANTS["ddim_eta0.5"]
    x, eps = _inputs((numel,), *dtypes)
    step = torch.tensor(17)
    z = torch.randn(numel)
    torch.testing.assert_close(rs.reverse_step(x, eps, step, coeffs, noise=z),
                               F.reverse_step(x, eps, step, coeffs, noise=z), **_tol(*dtypes))
    if numel < 1000 or dtypes == DTYPES[0]:  # the reference's Philox is slow at 2^20 elements: once
        torch.testing.assert_close(rs.reverse_step(x, eps, step, coeffs, seed=99),
                                   F.reverse_step(x, eps, step, coeffs, seed=99), **_tol(*dtypes))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_preset_shapes(shape):
    coeffs, _ = VARIANTS["labml"]
    x, eps = _inputs(shape, torch.float32, torch.float16)
    step = torch.tensor(500)
    torch.testing.assert_close(rs.reverse_step(x, eps, step, coeffs, seed=5),
                               F.reverse_step(x, eps, step, coeffs, seed=5), **tol("reverse_step", torch.float16))


# --- layouts -----------------------------------------------------------------------------------
def _layout(t, kind):
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "transposed":  # dense strides that are neither format
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "sliced":  # gaps between rows and a storage offset
        big = torch.empty(t.shape[0], t.shape[1], t.shape[2] + 1, t.shape[3] + 2, dtype=t.dtype)
        view = big[:, :, 1:, 1:-1]
        view.copy_(t)
        return view
    raise AssertionError(kind)


LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


@pytest.mark.parametrize("noise_layout", [None, "contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("eps_layout", LAYOUTS)
@pytest.mark.parametrize("x_layout", LAYOUTS)
def test_layouts(x_layout, eps_layout, noise_layout):
    coeffs, clip = VARIANTS["ddim_eta0_clipped"]
    x, eps = _inputs(SHAPES["odd"], torch.float32, torch.bfloat16)
    xl, el = _layout(x, x_layout), _layout(eps, eps_layout)
    z = None if noise_layout is None else _layout(torch.randn(x.shape), noise_layout)
    step = torch.tensor(3)
    got = rs.reverse_step(xl, el, step, coeffs, noise=z, seed=77, clip=clip)
    want = F.reverse_step(x, eps, step, coeffs, noise=z, seed=77, clip=clip)
    torch.testing.assert_close(got, want, **tol("reverse_step", torch.bfloat16))
    # the output follows x_t's memory format (channels_last stays channels_last, the rest contiguous)
    if x_layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 96, 7, 9), (3, 5, 3, 3), (2, 1, 5, 5)])
def test_channels_last_noise_uses_logical_index(shape):
    # The same logical element gets the same z whatever the memory order.
    coeffs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # prev = z
    x, eps = _inputs(shape)
    cl = rs.reverse_step(x.contiguous(memory_format=torch.channels_last), eps, torch.tensor(0), coeffs, seed=3)
    torch.testing.assert_close(cl, F.philox_normal(shape, 3, 0), **tol("philox_normal", torch.float32))


# --- in place -----------------------------------------------------------------------------------
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_inplace(x_layout, dtypes):
    # Every element is overwritten: one the kernel skipped would keep x_t's value and fail the compare.
    coeffs, clip = VARIANTS["paper_clipped"]
    x, eps = _inputs(SHAPES["odd"], *dtypes)
    step = torch.tensor(999)
    want = F.reverse_step(x, eps, step, coeffs, seed=11, clip=clip)
    buf = _layout(x.clone(), x_layout)
    ptr = buf.data_ptr()
    out = rs.reverse_step_(buf, eps, step, coeffs, seed=11, clip=clip)
    assert out is buf and buf.data_ptr() == ptr
    torch.testing.assert_close(buf, want, **_tol(*dtypes))


def test_inplace_with_eps_aliasing_x():
    coeffs, _ = VARIANTS["ddim_eta1"]
    x = torch.randn(2, 3, 16, 16)
    want = F.reverse_step(x, x, torch.tensor(4), coeffs, seed=2)
    rs.reverse_step_(x, x, torch.tensor(4), coeffs, seed=2)
    torch.testing.assert_close(x, want, **tol("reverse_step", torch.float32))


def test_inplace_rejects_partial_overlap():
    coeffs, _ = VARIANTS["labml"]
    base = torch.randn(1001)
    with pytest.raises(RuntimeError, match="single memory location"):
        rs.reverse_step_(base[1:], base[:-1], torch.tensor(0), coeffs)
    with pytest.raises(RuntimeError, match="single memory location"):
        rs.reverse_step_(torch.randn(1, 5).expand(4, 5), torch.randn(4, 5), torch.tensor(0), coeffs)


# --- step forms ----------------------------------------------------------------------------------
def test_step_forms_agree():
    coeffs, _ = VARIANTS["posterior"]
    x, eps = _inputs((2, 3, 8, 8))
    want = F.reverse_step(x, eps, torch.tensor(321), coeffs, seed=8)
    for step in (torch.tensor(321), torch.tensor([321]), torch.tensor(321, dtype=torch.int32), 321):
        torch.testing.assert_close(rs.reverse_step(x, eps, step, coeffs, seed=8), want,
                                   **tol("reverse_step", torch.float32))


def test_seed_is_taken_mod_2_64():
    coeffs, _ = VARIANTS["labml"]
    x, eps = _inputs((2, 3, 8, 8))
    step = torch.tensor(1)
    a = rs.reverse_step(x, eps, step, coeffs, seed=-1)
    b = rs.reverse_step(x, eps, step, coeffs, seed=2 ** 64 - 1)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, F.reverse_step(x, eps, step, coeffs, seed=2 ** 64 - 1),
                               **tol("reverse_step", torch.float32))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("seed", [0, 12345, 2 ** 63 + 5, 2 ** 64 - 1])
def test_seed_tensor_equals_int_seed(seed, layout):
    # A seed held in an int64 tensor (a CUDA-graph sampler's static buffer) draws the same noise as the
    # integer; seeds >= 2^63 are stored as their two's-complement int64, as the op's `int seed` is.
    coeffs, _ = VARIANTS["ddim_eta0.5"]
    x, eps = _inputs((2, 3, 8, 8))
    if layout == "cl":
        x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
    step = torch.tensor(7)
    seed_t = torch.tensor(rs.seed_arg(seed), dtype=torch.int64)
    want = rs.reverse_step(x, eps, step, coeffs, seed=seed)
    assert torch.equal(rs.reverse_step(x, eps, step, coeffs, seed=seed_t), want)
    y = x.clone()
    rs.reverse_step_(y, eps, step, coeffs, seed=seed_t)
    assert torch.equal(y, want)
    # The spec takes the tensor too.
    torch.testing.assert_close(F.reverse_step(x, eps, step, coeffs, seed=seed_t), want,
                               **tol("reverse_step", torch.float32))
    other = rs.reverse_step(x, eps, step, coeffs, seed=torch.tensor(rs.seed_arg(seed + 1)))
    assert not torch.equal(other, want)


# --- bad inputs raise from the binding ------------------------------------------------------------
def _ok():
    coeffs, _ = VARIANTS["labml"]
    x, eps = _inputs((2, 3, 8, 8))
    return dict(x_t=x, eps=eps, step=torch.tensor(0), coeffs=coeffs, noise=None, seed=0, clip_lo=0.0,
                clip_hi=0.0, clip=False, seed_tensor=None)


BAD = {
    "eps_shape": (dict(eps=torch.randn(2, 3, 8, 9)), ValueError, "eps shape"),
    "x_int": (dict(x_t=torch.ones(2, 3, 8, 8, dtype=torch.int32)), TypeError, "x_t must be"),
    "x_fp64": (dict(x_t=torch.randn(2, 3, 8, 8, dtype=torch.float64)), TypeError, "x_t must be"),
    "eps_int": (dict(eps=torch.ones(2, 3, 8, 8, dtype=torch.int64)), TypeError, "eps must be"),
    "x16_eps32": (dict(x_t=torch.randn(2, 3, 8, 8).half()), TypeError, "same dtype"),
    "x16_epsbf16": (dict(x_t=torch.randn(2, 3, 8, 8).half(), eps=torch.randn(2, 3, 8, 8).bfloat16()),
                    TypeError, "same dtype"),
    "step_float": (dict(step=torch.tensor(0.0)), TypeError, "int64"),
    "step_two": (dict(step=torch.tensor([0, 1])), ValueError, "exactly one"),
    "step_negative": (dict(step=torch.tensor(-1)), ValueError, "out of range"),
    "step_past_end": (dict(step=torch.tensor(1000)), ValueError, "out of range"),
    "coeffs_5_columns": (dict(coeffs=torch.zeros(1000, 5)), ValueError, r"\[S, 6\]"),
    "coeffs_1d": (dict(coeffs=torch.zeros(6)), ValueError, r"\[S, 6\]"),
    "coeffs_empty": (dict(coeffs=torch.zeros(0, 6)), ValueError, r"\[S, 6\]"),
    "coeffs_fp64": (dict(coeffs=torch.zeros(10, 6, dtype=torch.float64)), TypeError, "coeffs must be float32"),
    "coeffs_strided": (dict(coeffs=torch.zeros(6, 10).t()), ValueError, "contiguous"),
    "noise_shape": (dict(noise=torch.randn(2, 3, 8)), ValueError, "noise shape"),
    "noise_int": (dict(noise=torch.ones(2, 3, 8, 8, dtype=torch.int32)), TypeError, "noise must be"),
    "clip_reversed": (dict(clip=True, clip_lo=1.0, clip_hi=-1.0), ValueError, "lo <= hi"),
    "clip_nan": (dict(clip=True, clip_lo=float("nan"), clip_hi=1.0), ValueError, "lo <= hi"),
    "seed_tensor_float": (dict(seed_tensor=torch.tensor(1.0)), TypeError, "seed_tensor must be an int64"),
    "seed_tensor_two": (dict(seed_tensor=torch.tensor([1, 2])), ValueError, "exactly one seed"),
    "seed_tensor_meta": (dict(seed_tensor=torch.empty((), dtype=torch.int64, device="meta")), RuntimeError,
                         "seed_tensor is on meta"),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise(case, inplace):
    change, exc, msg = BAD[case]
    args = _ok()
    args.update(change)
    op = torch.ops.ddpm_fast.reverse_step_ if inplace else torch.ops.ddpm_fast.reverse_step
    with pytest.raises(exc, match=msg):
        op(*args.values())


def test_device_mismatch_raises():
    # No second real device here: a meta tensor mixed with CPU ones must still be refused by name.
    args = _ok()
    args["eps"] = torch.empty(2, 3, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="eps is on meta"):
        torch.ops.ddpm_fast.reverse_step(*args.values())


def test_wrapper_rejects_bad_python_arguments():
    coeffs, _ = VARIANTS["labml"]
    x, eps = _inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match="clip"):
        rs.reverse_step(x, eps, 0, coeffs, clip=(1.0,))
    with pytest.raises(TypeError, match="seed"):
        rs.reverse_step(x, eps, 0, coeffs, seed=1.5)
    with pytest.raises(TypeError):
        rs.reverse_step(x, eps, torch.tensor(0.0), coeffs)
    # No backward: refused rather than an output without grad_fn, or a write into a tracked leaf.
    for fn in (rs.reverse_step, rs.reverse_step_):
        with pytest.raises(RuntimeError, match="without a backward"):
            fn(x.clone().requires_grad_(), eps, 0, coeffs)
    with torch.no_grad():
        rs.reverse_step(x.clone().requires_grad_(), eps, 0, coeffs)


# --- op registration -------------------------------------------------------------------------------
def _opcheck_cases(device):
    coeffs, _ = VARIANTS["ddim_eta0.5"]
    coeffs = coeffs.to(device)
    x, eps = _inputs((2, 3, 8, 8), device=device)
    step = torch.tensor(3, device=device)
    xh, eh = _inputs((1, 4, 5, 3), torch.float16, torch.float16, device=device)
    return [
        (x, eps, step, coeffs, None, 7, 0.0, 0.0, False),
        (x, eps.bfloat16(), step, coeffs, torch.randn(x.shape, device=device), 7, -1.0, 1.0, True),
        (x.contiguous(memory_format=torch.channels_last), eps, step.cpu(), coeffs, None, -3, 0.0, 0.0, False),
        (xh, eh, step, coeffs, None, 2 ** 40, 0.0, 0.0, False),
        (x, eps, step, coeffs, None, 0, 0.0, 0.0, False, torch.tensor(-5, dtype=torch.int64, device=device)),
    ]


@pytest.mark.parametrize("name", ["reverse_step", "reverse_step_"])
def test_opcheck_cpu(name):
    op = getattr(torch.ops.ddpm_fast, name).default
    for args in _opcheck_cases("cpu"):
        args = (args[0].clone(),) + args[1:]
        torch.library.opcheck(op, args)


def test_schemas_match_the_python_fallback():
    for name, schema in rs.SCHEMAS.items():
        assert str(getattr(torch.ops.ddpm_fast, name).default._schema) == "ddpm_fast::" + schema


@no_ext_ok
def test_fallback_without_extension_warns_once_and_matches_reference():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ddpm_fast.ops\n"
        "    import importlib; rs = importlib.import_module('ddpm_fast.ops.reverse_step')\n"
        "msgs = [str(x.message) for x in w if 'ddpm_fast._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not rs.HAS_EXTENSION\n"
        "from ddpm_fast.reference import functional as F\n"
        "from ddpm_fast.reference.diffusion import Schedule\n"
        "s = Schedule(); c = s.ddpm_coeffs(s.timesteps(1000))\n"
        "x = torch.randn(2, 3, 8, 8); e = torch.randn(2, 3, 8, 8); st = torch.tensor(5)\n"
        "assert torch.equal(rs.reverse_step(x, e, st, c, seed=3), F.reverse_step(x, e, st, c, seed=3))\n"
        "y = x.clone(); rs.reverse_step_(y, e, st, c, seed=3)\n"
        "assert torch.equal(y, F.reverse_step(x, e, st, c, seed=3))\n"
        "try:\n"
        "    rs.reverse_step(x, e, torch.tensor(1000), c)\n"
        "    raise SystemExit('no error for an out-of-range step')\n"
        "except ValueError as err:\n"
        "    assert 'out of range' in str(err)\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, DDPM_FAST_DISABLE_EXT="1", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout + res.stderr


# --- the CUDA sources compile on this machine ------------------------------------------------------
NVCC = shutil.which("nvcc") or (shutil.which("nvcc", path="/usr/local/cuda/bin"))


@no_ext_ok
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    # The flags setup.py's CUDAExtension passes (torch's COMMON_NVCC_FLAGS turn off __half's implicit
    # conversions and operators), for the H100.
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cmd = [NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math", "-lineinfo", *COMMON_NVCC_FLAGS,
           "-DDDPM_FAST_WITH_CUDA=1", "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-warn-spills",
           str(ROOT / "csrc" / "reverse_step_cuda.cu"), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "spill" not in res.stderr.lower() and "warning" not in res.stderr.lower(), res.stderr


def _cuda_include():
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


@no_ext_ok
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and CUDA headers")
def test_binding_cuda_section_compiles():
    # The CUDA half of bindings.cpp only builds on a CUDA torch; check it parses and type-checks here.
    from torch.utils.cpp_extension import include_paths

    cmd = ["g++", "-fsyntax-only", "-std=c++17", "-w", "-DDDPM_FAST_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{sysconfig.get_paths()['include']}", f"-I{_cuda_include()}", str(ROOT / "csrc" / "bindings.cpp")]
    cmd[5:5] = [f"-I{p}" for p in include_paths()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


# --- GPU: the CUDA kernel -------------------------------------------------------------------------
def _cuda_ext():
    if not rs.EXTENSION_HAS_CUDA:
        pytest.fail("ddpm_fast._C was built without CUDA on a machine with a GPU (CUDA_HOME unset at build?)")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "unaligned"])
@pytest.mark.parametrize("noise", ["philox", "injected"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_cuda_matches_cpu(dtypes, noise, layout):
    _cuda_ext()
    coeffs, clip = VARIANTS["paper_clipped"]
    for shape in [(3, 96, 7, 9), (16, 3, 32, 32), (1, 1, 1, 7)]:
        x, eps = _inputs(shape, *dtypes)
        z = torch.randn(shape) if noise == "injected" else None
        if layout == "channels_last":
            x, eps = x.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        xc, ec = x.cuda(), eps.cuda()
        zc = None if z is None else z.cuda()
        if layout == "unaligned":  # views one element into a buffer: the kernel's scalar path
            def shift(t):
                buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
                view = buf[1:].view(t.shape)
                view.copy_(t)
                return view
            xc, ec = shift(xc), shift(ec)
            zc = None if zc is None else shift(zc)
        for row in _rows(coeffs):
            want = rs.reverse_step(x, eps, torch.tensor(row), coeffs, noise=z, seed=21, clip=clip)
            # Poison: a NaN-filled block of the output's size, freed, is what the caching allocator
            # hands the op next (the step and the table are allocated before it, so nothing else takes
            # the block), so an element the kernel skips stays NaN and fails the comparison.
            step_c, coeffs_c = torch.tensor(row, device="cuda"), coeffs.cuda()
            del_me = poison(torch.empty(x.shape, dtype=x.dtype, device="cuda"))
            poisoned_at = del_me.data_ptr()
            del del_me
            got = rs.reverse_step(xc, ec, step_c, coeffs_c, noise=zc, seed=21, clip=clip)
            assert got.data_ptr() == poisoned_at, "the output did not land on the poisoned block"
            torch.testing.assert_close(got.cpu(), want, **_tol(*dtypes))
            # and the injected-noise path matches the reference itself
            if noise == "injected":
                torch.testing.assert_close(got.cpu(), F.reverse_step(x, eps, torch.tensor(row), coeffs, noise=z,
                                                                     clip=clip), **_tol(*dtypes))


@pytest.mark.gpu
def test_cuda_large_and_philox_stream():
    _cuda_ext()
    coeffs = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], device="cuda")
    x = torch.randn(2 ** 20 + 3, device="cuda")
    got = rs.reverse_step(x, x, torch.zeros((), dtype=torch.long, device="cuda"), coeffs, seed=2 ** 63 + 5)
    torch.testing.assert_close(got.cpu(), F.philox_normal(x.shape, 2 ** 63 + 5, 0), **tol("philox_normal",
                                                                                          torch.float32))


def _captured_step(x, eps, step, coeffs, seed):
    """reverse_step_ in place on x, captured in a CUDA graph after one warm-up call off the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rs.reverse_step_(x, eps, step, coeffs, seed=seed)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rs.reverse_step_(x, eps, step, coeffs, seed=seed)
    return graph


@pytest.mark.gpu
def test_cuda_graph_replay_draws_fresh_noise_per_step():
    _cuda_ext()
    coeffs, _ = VARIANTS["labml"]
    coeffs = coeffs.cuda()
    x0, eps0 = _inputs((4, 3, 32, 32))
    x, eps = x0.cuda(), eps0.cuda()
    step = torch.zeros((), dtype=torch.long, device="cuda")
    graph = _captured_step(x, eps, step, coeffs, seed=9)
    outs = []
    for row in (0, 1, 2, 999):
        x.copy_(x0.cuda())
        step.fill_(row)
        graph.replay()
        torch.cuda.synchronize()
        want = F.reverse_step(x0, eps0, torch.tensor(row), coeffs.cpu(), seed=9)
        torch.testing.assert_close(x.cpu(), want, **tol("reverse_step", torch.float32))
        outs.append(x.cpu().clone())
    for a in range(len(outs)):
        for b in range(a + 1, len(outs)):
            assert not torch.equal(outs[a], outs[b])


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_device_seed():
    # One capture serves several sampling runs: the kernel reads the seed tensor on every replay.
    _cuda_ext()
    coeffs, _ = VARIANTS["labml"]
    coeffs = coeffs.cuda()
    x0, eps0 = _inputs((4, 3, 32, 32))
    x, eps = x0.cuda(), eps0.cuda()
    step = torch.full((), 5, dtype=torch.long, device="cuda")
    seed = torch.zeros((), dtype=torch.long, device="cuda")
    graph = _captured_step(x, eps, step, coeffs, seed=seed)
    for s in (1, 2 ** 63 + 5, 77):
        x.copy_(x0.cuda())
        seed.fill_(rs.seed_arg(s))
        graph.replay()
        torch.cuda.synchronize()
        want = F.reverse_step(x0, eps0, torch.tensor(5), coeffs.cpu(), seed=s)
        torch.testing.assert_close(x.cpu(), want, **tol("reverse_step", torch.float32))


@pytest.mark.gpu
def test_cuda_step_range():
    _cuda_ext()
    coeffs, _ = VARIANTS["labml"]
    x, eps = _inputs((2, 3, 8, 8), device="cuda")
    # device step: no host read, so the kernel flags it by writing NaN everywhere
    bad = rs.reverse_step(x, eps, torch.tensor(1000, device="cuda"), coeffs.cuda())
    assert torch.isnan(bad).all()
    # host step: checked without a sync, raised
    with pytest.raises(ValueError, match="out of range"):
        rs.reverse_step(x, eps, torch.tensor(-1), coeffs.cuda())
    with pytest.raises(RuntimeError, match="coeffs is on"):
        rs.reverse_step(x, eps, torch.tensor(0), coeffs)
    with pytest.raises(RuntimeError, match="eps is on"):
        rs.reverse_step(x, eps.cpu(), torch.tensor(0), coeffs.cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["reverse_step", "reverse_step_"])
def test_opcheck_cuda(name):
    _cuda_ext()
    op = getattr(torch.ops.ddpm_fast, name).default
    for args in _opcheck_cases("cuda"):
        args = (args[0].clone(),) + args[1:]
        torch.library.opcheck(op, args)
