"""The fused time embedding (Triton kernel and the `ddpm_fast::time_embedding` op) against the
reference, and the per-model time-projection table (TimeTable) against the computed time path.

On CPU the Triton kernel runs through the interpreter (`time_embedding_triton`); the op's CPU kernel
is the reference itself. CUDA runs both when present.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import DEVICES, DTYPES, poison
from ddpm_fast.config import PRESETS
from ddpm_fast.ops.time_embedding import HAS_TRITON, time_embedding, time_embedding_triton
from ddpm_fast.sampling.time_table import TimeTable, attach_time_table, detach_time_table
from ddpm_fast.reference import UNet, functional as ref
from tolerances import tol

# Triton kernels on CPU tensors (the interpreter) unless a test runs on CUDA: see conftest.
pytestmark = pytest.mark.interpreter

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")

T = 1000  # every preset's n_steps; t runs over [0, T)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# E = 4 * n_channels of each preset (digits16 shares tiny's 128), plus the odd n_channels = 96.
WIDTHS = [PRESETS["tiny"].unet.time_channels, PRESETS["labml-cifar32"].unet.time_channels,
          PRESETS["cifar35m"].unet.time_channels, 4 * 96]
WIDTH_IDS = ["tiny-E128", "labml32-E256", "cifar35m-E512", "odd-E384"]


def _weights(e, dtype=torch.float32, device="cpu"):
    """Fresh nn.Linear-style weights (uniform, bound 1/sqrt(fan_in)) for TimeEmbedding(E)."""
    def u(*shape, fan_in):
        return ((torch.rand(*shape) * 2 - 1) / fan_in ** 0.5).to(device=device, dtype=dtype)

    return [u(e, e // 4, fan_in=e // 4), u(e, fan_in=e // 4), u(e, e, fan_in=e), u(e, fan_in=e)]


def _steps(b, device="cpu"):
    """b steps: the largest first (the biggest sinusoid arguments), then 0, then random ones."""
    t = torch.randint(0, T, (b,))
    t[0] = T - 1
    if b > 1:
        t[1] = 0
    return t.to(device)


# --------------------------------------------------------------------------------------------
# The kernel and the op
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 3, 64])
@pytest.mark.parametrize("e", WIDTHS, ids=WIDTH_IDS)
def test_kernel_matches_reference(e, batch, dtype, device):
    w = _weights(e, dtype, device)
    t = _steps(batch, device)
    expected = ref.time_embedding(t, *w)
    out = poison(torch.empty(batch, e, dtype=dtype, device=device))
    got = time_embedding_triton(t, *w, out=out)
    assert got is out
    assert not got.isnan().any(), "kernel left output elements unwritten"
    torch.testing.assert_close(got, expected, **tol("time_embedding", dtype))
    if device == "cuda":  # the registered op dispatches to the same kernel
        torch.testing.assert_close(time_embedding(t, *w), expected, **tol("time_embedding", dtype))


# The DDPM UNet's sinusoid (diffusers' get_timestep_embedding): width = the base channels, E = 4 * width;
# cifar10-32 / the 256x256 layouts have width 128, a reduced-width test model 32.
DDPM_WIDTHS = [4 * 128, 4 * 32]
SINUSOIDS = [(0, False), (0, True), (1, False), (1, True), (None, True), (0.5, False)]
SINUSOID_IDS = [f"shift{s}-{'cos_sin' if f else 'sin_cos'}" for s, f in SINUSOIDS]


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("sinusoid", SINUSOIDS, ids=SINUSOID_IDS)
@pytest.mark.parametrize("e", DDPM_WIDTHS, ids=["C128-E512", "C32-E128"])
def test_kernel_ddpm_sinusoid(e, sinusoid, batch, dtype, device):
    shift, flip = sinusoid
    w = _weights(e, dtype, device)
    t = _steps(batch, device)  # t = 999 first
    expected = ref.time_embedding(t, *w, shift, flip)
    out = poison(torch.empty(batch, e, dtype=dtype, device=device))
    got = time_embedding_triton(t, *w, out=out, freq_shift=shift, flip_sin_to_cos=flip)
    assert got is out
    torch.testing.assert_close(got, expected, **tol("time_embedding", dtype))
    # The flags reach the kernel: the other order (or labml's frequencies, far from shift 1) is far off.
    other = ref.time_embedding(t, *w, shift, not flip)
    assert (other.float() - got.float()).abs().max() > 20 * tol("time_embedding", dtype)["atol"]
    if device == "cuda":
        torch.testing.assert_close(time_embedding(t, *w, shift, flip), expected, **tol("time_embedding", dtype))


@pytest.mark.parametrize("sinusoid", SINUSOIDS, ids=SINUSOID_IDS)
def test_op_cpu_ddpm_sinusoid_is_the_reference(sinusoid):
    shift, flip = sinusoid
    w = _weights(128)
    t = _steps(3)
    want = ref.time_embedding(t, *w, shift, flip)
    assert torch.equal(time_embedding(t, *w, shift, flip), want)
    assert torch.equal(torch.ops.ddpm_fast.time_embedding(t, *w, None if shift is None else float(shift), flip), want)
    torch.library.opcheck(torch.ops.ddpm_fast.time_embedding.default,
                          (t, *w, None if shift is None else float(shift), flip),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("fn", [time_embedding, time_embedding_triton], ids=["op", "launcher"])
@pytest.mark.parametrize("kw, exc, match", [
    (dict(freq_shift=16), ValueError, "half - freq_shift"),          # width 32: 16 frequencies
    (dict(freq_shift=float("nan")), ValueError, "finite"),
    (dict(freq_shift="1"), TypeError, "freq_shift must be None or a number"),
    (dict(freq_shift=True), TypeError, "freq_shift must be None or a number"),
    (dict(flip_sin_to_cos=1), TypeError, "flip_sin_to_cos must be a bool"),
], ids=["shift-half", "shift-nan", "shift-str", "shift-bool", "flip-int"])
def test_bad_sinusoid_args_raise(fn, kw, exc, match):
    if fn is time_embedding_triton and not HAS_TRITON:
        pytest.skip("triton is not importable")
    with pytest.raises(exc, match=match):
        fn(_steps(2), *_weights(128), **kw)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_strided_inputs_and_int32_steps(device):
    e = 384
    w1, b1, w2, b2 = _weights(e, device=device)
    w1 = w1.t().contiguous().t()  # column-major views of the same values
    w2 = w2.t().contiguous().t()
    t = _steps(6, device).to(torch.int32)[::2]  # stride 2
    out = poison(torch.empty(e, 3, device=device)).t()  # column-major [3, E] output
    got = time_embedding_triton(t, w1, b1, w2, b2, out=out)
    torch.testing.assert_close(got, ref.time_embedding(t, w1, b1, w2, b2), **tol("time_embedding", torch.float32))


@needs_triton
def test_kernel_empty_batch():
    w = _weights(128)
    assert time_embedding_triton(torch.empty(0, dtype=torch.long), *w).shape == (0, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_op_cpu_kernel_is_the_reference(dtype):
    w = _weights(256, dtype)
    t = _steps(3)
    out = time_embedding(t, *w)
    assert out.dtype == dtype and out.shape == (3, 256)
    assert torch.equal(out, ref.time_embedding(t, *w))


def test_opcheck_cpu():
    # The aot_dispatch tests need the Triton kernel under fake tensors, which the interpreter cannot
    # do (see DESIGN.md); they run in test_opcheck_cuda.
    args = (_steps(3), *_weights(128))
    torch.library.opcheck(torch.ops.ddpm_fast.time_embedding.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _bad_inputs():
    e = 128
    w1, b1, w2, b2 = _weights(e)
    t = _steps(3)
    cases = {
        "t-2d": ((t[None], w1, b1, w2, b2), ValueError, "1-D"),
        "t-float": ((t.float(), w1, b1, w2, b2), TypeError, "integer dtype"),
        "t-bool": ((t > 0, w1, b1, w2, b2), TypeError, "integer dtype"),
        "t-not-tensor": (([1, 2], w1, b1, w2, b2), TypeError, "t must be a torch.Tensor"),
        "lin1-shape": ((t, w1[:, :-2], b1, w2, b2), ValueError, "lin1_weight must have shape"),
        "lin1-bias-shape": ((t, w1, b1[:-1], w2, b2), ValueError, "lin1_bias must have shape"),
        "lin2-not-square": ((t, w1, b1, w2[:-1], b2), ValueError, "square"),
        "lin2-bias-shape": ((t, w1, b1, w2, b2[None]), ValueError, "lin2_bias must have shape"),
        "width-odd-sinusoid": ((t, *_weights(20)), ValueError, "E = 20"),
        "dtype-mix": ((t, w1, b1, w2.half(), b2), TypeError, "lin2_weight has dtype"),
        "dtype-fp64": ((t, *[x.double() for x in (w1, b1, w2, b2)]), TypeError, "float32, float16 or bfloat16"),
        "device-mix": ((t.to("meta"), w1, b1, w2, b2), RuntimeError, "t is on meta"),
    }
    return [pytest.param(*v, id=k) for k, v in cases.items()]


@pytest.mark.parametrize("fn", [time_embedding, time_embedding_triton], ids=["op", "launcher"])
@pytest.mark.parametrize("args, exc, match", _bad_inputs())
def test_bad_inputs_raise(fn, args, exc, match):
    if fn is time_embedding_triton and not HAS_TRITON:
        pytest.skip("triton is not importable")
    with pytest.raises(exc, match=match):
        fn(*args)


@needs_triton
def test_launcher_rejects_bad_out():
    w = _weights(128)
    with pytest.raises(ValueError, match="out must be"):
        time_embedding_triton(_steps(3), *w, out=torch.empty(3, 64))
    with pytest.raises(ValueError, match="out must be"):
        time_embedding_triton(_steps(3), *w, out=torch.empty(3, 128, dtype=torch.float16))


def test_module_works_without_triton():
    # In a fresh interpreter where `import triton` fails (and with the ops package's other modules
    # kept out of the way), the module imports, the op runs the reference, the launcher refuses.
    code = textwrap.dedent("""
        import os, sys, types
        sys.modules["triton"] = None
        import torch, ddpm_fast
        pkg = types.ModuleType("ddpm_fast.ops")
        pkg.__path__ = [os.path.join(os.path.dirname(ddpm_fast.__file__), "ops")]
        sys.modules["ddpm_fast.ops"] = pkg
        from ddpm_fast.ops.time_embedding import HAS_TRITON, time_embedding, time_embedding_triton
        from ddpm_fast.reference.functional import time_embedding as ref
        assert not HAS_TRITON
        w = [torch.randn(128, 32), torch.randn(128), torch.randn(128, 128), torch.randn(128)]
        t = torch.tensor([0, 999])
        assert torch.equal(time_embedding(t, *w), ref(t, *w))
        try:
            time_embedding_triton(t, *w)
        except RuntimeError as e:
            assert "triton is not importable" in str(e)
        else:
            raise AssertionError("launcher ran without triton")
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_opcheck_cuda(dtype):
    args = (_steps(5, "cuda"), *_weights(256, dtype, "cuda"))
    torch.library.opcheck(torch.ops.ddpm_fast.time_embedding.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_torch_compile_fullgraph_cuda(dtype):
    w = _weights(512, dtype, "cuda")
    t = _steps(7, "cuda")
    compiled = torch.compile(time_embedding, fullgraph=True)
    torch.testing.assert_close(compiled(t, *w), ref.time_embedding(t, *w), **tol("time_embedding", dtype))


# --------------------------------------------------------------------------------------------
# The time-projection table
# --------------------------------------------------------------------------------------------
def _model(preset="tiny", dtype=torch.float32, device="cpu"):
    return UNet(PRESETS[preset].unet).eval().to(device=device, dtype=dtype)


def _computed(model, t):
    """The model's own time path without a table: TimeEmbedding then every block's projection."""
    t_emb = model.time_emb(t)
    return [blk.time_projection(t_emb) for blk in model.res_blocks()]


def _assert_lookup_matches(table, model, t, dtype):
    with torch.no_grad():
        got, want = table.lookup(t), _computed(model, t)
    assert len(got) == len(want) == len(model.res_blocks())
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol("time_table", dtype))


def _assert_stale(old_rows, model, t):
    """The rows from before a weight change fail against the new computed path: a lookup that
    passes afterwards can only have come from a rebuilt table."""
    with torch.no_grad():
        want = _computed(model, t)
    with pytest.raises(AssertionError):
        for o, w in zip(old_rows, want):
            torch.testing.assert_close(o, w, **tol("time_table", w.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("preset", ["tiny", "digits16", "labml-cifar32"])
def test_table_lookup_matches_computed_path(preset, dtype):
    if preset == "labml-cifar32" and dtype != torch.float32:
        pytest.skip("the largest preset once, in fp32, keeps the CPU run short")
    model = _model(preset, dtype)
    table = TimeTable(model, T)
    assert table.table.shape == (T, sum(b.time_emb.out_features for b in model.res_blocks()))
    assert table.table.dtype == dtype
    for b in (1, 3):
        _assert_lookup_matches(table, model, _steps(b), dtype)


def test_unet_forward_with_table_equals_computed():
    model = _model("tiny")
    x = torch.randn(3, 3, 16, 16)
    t = _steps(3)
    with torch.no_grad():
        plain = model(x, t)
        table = attach_time_table(model, T)
        assert model.time_table is table
        tabled = model(x, t)
        assert detach_time_table(model) is table and model.time_table is None
    torch.testing.assert_close(tabled, plain, **tol("time_table_unet", torch.float32))


def _attached_with_rows(model):
    """Attach a table to `model`; return it, 3 steps, and copies of their rows before any change."""
    table = attach_time_table(model, T)
    t = _steps(3)
    with torch.no_grad():
        before = [x.clone() for x in table.lookup(t)]
    return table, t, before


def _perturb_grads(model):
    for p in model.parameters():
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1), id="sgd"),
    pytest.param(lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True), id="adam-foreach"),
])
def test_table_rebuilds_after_optimizer_step(make_opt):
    model = _model("tiny")
    table, t, before = _attached_with_rows(model)
    _perturb_grads(model)
    make_opt(model.parameters()).step()
    assert table.is_stale()
    _assert_stale(before, model, t)
    _assert_lookup_matches(table, model, t, torch.float32)
    assert not table.is_stale()


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_table_rebuilds_after_load_state_dict(assign):
    model, other = _model("tiny"), _model("tiny")  # two random initialisations
    table, t, before = _attached_with_rows(model)
    model.load_state_dict(other.state_dict(), assign=assign)
    _assert_stale(before, model, t)
    _assert_lookup_matches(table, model, t, torch.float32)


def test_table_rebuilds_after_module_swap():
    model = _model("tiny")
    table = attach_time_table(model, T)
    blk = model.res_blocks()[3]
    blk.time_emb = torch.nn.Linear(blk.time_emb.in_features, blk.time_emb.out_features)
    assert table.is_stale()
    _assert_lookup_matches(table, model, _steps(3), torch.float32)


@pytest.mark.parametrize("edit", ["in-place", "new-parameter", "new-conv"])
def test_table_follows_conv1_bias(edit):
    # Each row carries its block's conv1 bias (ResidualBlock.time_projection): changing that bias in
    # place, replacing the Parameter, or replacing conv1 itself must rebuild the table.
    model = _model("tiny")
    table, t, before = _attached_with_rows(model)
    blk = model.res_blocks()[2]
    with torch.no_grad():
        if edit == "in-place":
            blk.conv1.bias.add_(0.5)
        elif edit == "new-parameter":
            blk.conv1.bias = torch.nn.Parameter(blk.conv1.bias + 0.5)
        else:
            old = blk.conv1
            blk.conv1 = torch.nn.Conv2d(old.in_channels, old.out_channels, 3, padding=1)
    assert table.is_stale()
    _assert_stale(before, model, t)
    _assert_lookup_matches(table, model, t, torch.float32)


def test_table_follows_dtype_round_trip():
    # half() then float() keeps every Parameter object and version counter but swaps the storage and
    # rounds the weights: the table must follow both conversions.
    model = _model("tiny")
    table, t, before = _attached_with_rows(model)
    model.half()
    _assert_lookup_matches(table, model, t, torch.float16)
    assert table.table.dtype == torch.float16
    model.float()
    _assert_stale(before, model, t)
    _assert_lookup_matches(table, model, t, torch.float32)


def test_refresh_after_data_write():
    # Writes through `.data` bypass version counters (documented); refresh() is the way to follow them.
    model = _model("tiny")
    table = attach_time_table(model, T)
    model.time_emb.lin2.bias.data.add_(0.5)
    table.refresh()
    _assert_lookup_matches(table, model, _steps(3), torch.float32)


def test_lookup_with_grad_enabled_keeps_gradients():
    model = _model("tiny")
    table = attach_time_table(model, T)
    t = _steps(3)
    got = table.lookup(t)  # grad mode on, weights require grad: computed, differentiable
    assert all(g.requires_grad for g in got)
    sum(g.sum() for g in got).backward()
    assert model.time_emb.lin1.weight.grad is not None
    with torch.no_grad():
        rows = table.lookup(t)
    for g, r in zip(got, rows):
        torch.testing.assert_close(g.detach(), r, **tol("time_table", torch.float32))


def test_table_bad_inputs():
    model = _model("tiny")
    with pytest.raises(ValueError, match="n_steps"):
        TimeTable(model, 0)
    with pytest.raises(TypeError, match="UNet"):
        TimeTable(torch.nn.Linear(2, 2), T)
    table = TimeTable(model, T)
    with torch.no_grad():
        with pytest.raises(TypeError, match="integer dtype"):
            table.lookup(torch.tensor([1.0]))
        with pytest.raises(ValueError, match="1-D"):
            table.lookup(torch.tensor([[1]]))
        with pytest.raises(IndexError):
            table.lookup(torch.tensor([T]))


@pytest.mark.gpu
def test_table_lookup_under_cuda_graph_capture():
    model = _model("tiny", device="cuda")
    table = attach_time_table(model, T)
    static_t = _steps(3, "cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
            table.lookup(static_t)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = table.lookup(static_t)
        for t_new in ([5, 0, 999], [17, 400, 3]):
            static_t.copy_(torch.tensor(t_new, device="cuda"))
            graph.replay()
            torch.cuda.synchronize()
            want = _computed(model, static_t)
            for o, w in zip(outs, want):
                torch.testing.assert_close(o, w, **tol("time_table", torch.float32))


# --- writes the version counters do not see ---------------------------------------------------------
@pytest.mark.parametrize("fused_optimizer", [True, False])
def test_an_optimizer_step_makes_the_table_stale(fused_optimizer):
    # torch.optim's fused=True steps write parameters without bumping their version counters.
    model = UNet(PRESETS["tiny"].unet)
    table = TimeTable(model, 10)
    assert not table.is_stale()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused_optimizer)
    model(torch.randn(1, 3, 16, 16), torch.tensor([3])).square().mean().backward()
    opt.step()
    assert table.is_stale()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(table.lookup(torch.tensor([4])), 1),
                                   torch.cat(TimeTable(model, 10).lookup(torch.tensor([4])), 1),
                                   **tol("time_table", torch.float32))


def test_a_partly_frozen_time_path_keeps_its_gradients():
    model = UNet(PRESETS["tiny"].unet)
    model.time_emb.requires_grad_(False)  # the shared MLP frozen, the blocks' projections trained
    attach_time_table(model, 10)
    model(torch.randn(1, 3, 16, 16), torch.tensor([3])).square().mean().backward()
    block = model.res_blocks()[0]
    assert block.time_emb.weight.grad is not None and block.conv1.bias.grad is not None


def test_a_model_made_in_inference_mode_gets_a_table():
    with torch.inference_mode():
        model = UNet(PRESETS["tiny"].unet)
    table = TimeTable(model, 10)  # inference tensors have no version counter to read
    assert not table.is_stale()
    block = model.res_blocks()[0]
    with torch.no_grad():  # as sampling runs it
        rows = table.lookup(torch.tensor([4]))
        want = block.time_projection(model.time_emb(torch.tensor([4])))
    torch.testing.assert_close(rows[0], want, **tol("time_table", torch.float32))
