#!/usr/bin/env python3
"""Compile every Triton kernel of ddpm_fast.ops ahead of time for an H100 (sm_90), without a GPU.

    python scripts/triton_compile_check.py [--batches 1,3,16,64,256] [--sms 132] [--json out.json]
    python scripts/triton_compile_check.py --compare a.json b.json    (two runs side by side)

The CPU tests run the kernels under the interpreter, which checks the math, not whether the installed
Triton's GPU compiler accepts them. Here the real launchers run on meta-device tensors at the presets'
layer shapes (read off a meta-device UNet) plus the tests' odd shapes, with their launches recorded
instead of run and the device queries answered for an H100. Each launch is specialised as
JITFunction.run would (its own binder: ints equal to 1 become constants, 16-divisible ints and aligned
pointers get hints) and compiled to a cubin for GPUTarget("cuda", arch, 32); ptxas's log gives
registers and spills, metadata.shared the shared memory. Uses Triton internals present in 3.6 to 3.9.
Exit 1 if a config fails to compile or needs more than an H100 block's 227 KB of shared memory (its
launch would fail); spills are flagged (SPILL), failures only with --strict.
"""
import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even if a test shell left it on
os.environ["TRITON_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="triton_cc_")  # fresh: every kernel compiles
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # make_cubin prints ptxas -v; captured per compile below
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from ddpm_fast.config import PRESETS  # noqa: E402

gn = importlib.import_module("ddpm_fast.ops.groupnorm_swish")
att = importlib.import_module("ddpm_fast.ops.attention")
te = importlib.import_module("ddpm_fast.ops.time_embedding")
cv = importlib.import_module("ddpm_fast.ops.conv2d")
ct = importlib.import_module("ddpm_fast.ops.conv_transpose2d")
ra = importlib.import_module("ddpm_fast.ops.residual_add")
gemm = importlib.import_module("ddpm_fast.ops._conv_gemm")
shapes = importlib.import_module("ddpm_fast.testing.shapes")

H100_SMS = 132  # SXM5; the PCIe card has 114 (--sms): the launchers size grids and splits by it
H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
META = torch.device("meta")


# --- recording the launchers' launches -------------------------------------------------------------
class Recorder:
    """Stands in for a jitted kernel (or its wrap_triton wrapper): kernel[grid](*args, **kw) is logged."""
    log = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: Recorder.log.append((self.kernel, args, kw))


for _mod, _names in ((gn, ("_launch", "plan")), (att, ("wrap_triton", "_programs_wanted", "dot_flags"))):
    for _name in _names:  # the launchers' hooks patched below; fail loudly if one was renamed
        assert hasattr(_mod, _name), f"{_mod.__name__}.{_name} is gone: update this script"
_plan, _dot_flags = gn.plan, att.dot_flags
gn._launch = lambda kernel, grid, args, meta, num_warps: Recorder(kernel)[grid](*args, **meta, num_warps=num_warps)
gn.plan = lambda b, c, hw, g, cl, sms, *a: _plan(b, c, hw, g, cl, H100_SMS if sms is None else sms, *a)
att.wrap_triton = Recorder
att._programs_wanted = lambda device: H100_SMS
att.dot_flags = lambda dtype, device, allow_tf32=None: _dot_flags(dtype, torch.device("cuda"), allow_tf32)
for _mod in (cv, ct, ra):
    assert hasattr(_mod, "wrap_triton"), f"{_mod.__name__}.wrap_triton is gone: update this script"
    _mod.wrap_triton = Recorder
gemm.sms = lambda device: H100_SMS  # both convs plan through _conv_gemm
cv.dot_flags = ct.dot_flags = att.dot_flags


def unet_shapes(cfg):
    """(groupnorm calls, attention calls) a UNet of `cfg` makes at batch 1, from a meta-device run."""
    from ddpm_fast.reference import functional as ref
    from ddpm_fast.reference.unet import OpsModule, UNet

    norms, attns = set(), set()
    ns = types.SimpleNamespace(**{k: getattr(ref, k) for k in ref.__all__})
    ns.groupnorm_swish = lambda x, w, b, g, eps=1e-5, add=None, swish=True: (
        norms.add((x.shape[1], x.shape[2], x.shape[3], g, add is not None, swish)), torch.empty_like(x))[1]
    ns.attention = lambda x, pw, pb, ow, ob, nh, dk: (
        attns.add((x.shape[1], x.shape[2], x.shape[3], nh, dk)), torch.empty_like(x))[1]
    with torch.device("meta"):
        model = UNet(cfg)
        for m in model.modules():
            if isinstance(m, OpsModule):
                m.F = ns
        model(torch.empty(1, cfg.image_channels, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long))
    return sorted(norms), sorted(attns)


def record_all(batches, dtypes):
    """Yield (label, dtype name, launch) for every launch the launchers make at the presets' shapes."""
    odd_norms = [(96, 7, 9, 32, True, False), (96, 7, 9, 32, False, True)]  # the tests' odd shapes
    for name, mc in list(PRESETS.items()) + [("odd", None)]:
        norms, attns = unet_shapes(mc.unet) if mc else (odd_norms, [(96, 7, 9, 2, 48)])
        e = mc.unet.time_channels if mc else 96 * 4
        for dn, b in ((dn, b) for dn in dtypes for b in batches):
            new = lambda *shape, dtype=DTYPES[dn]: torch.empty(*shape, dtype=dtype, device=META)  # noqa: E731
            for cl in (False, True):
                fmt, tag = (torch.channels_last, " CL") if cl else (torch.contiguous_format, "")
                for (c, h, w, g, has_add, swish) in norms:
                    yield from _run(f"{name} gn C{c} {h}x{w} G{g} B{b}{tag}", dn, gn.groupnorm_swish_triton,
                                    new(b, c, h, w).to(memory_format=fmt), new(c), new(c), g,
                                    add=new(b, c) if has_add else None, swish=swish)
                for (c, h, w, nh, dk) in attns:
                    params = (new(3 * nh * dk, c), new(3 * nh * dk), new(c, nh * dk), new(c))
                    for tf32 in (False, True) if dn == "fp32" else (False,):  # picks fp32's dot precision
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        x = new(b, c, h, w).to(memory_format=fmt)
                        yield from _run(f"{name} attn C{c} {h}x{w} h{nh} dk{dk} B{b}{tag}{' tf32' if tf32 else ''}",
                                        dn, att.attention_triton, x, *params, nh, dk)
                    torch.backends.cuda.matmul.allow_tf32 = False
                convs = shapes.unet_conv_shapes(mc.unet) if mc else [(96, 7, 9, 40, 3, 1, True), (96, 7, 9, 40, 1, 1, False)]
                for (ci, h, w, co, k, st, has_bias) in convs:
                    x = new(b, ci, h, w).to(memory_format=fmt)
                    yield from _run(f"{name} conv {ci}->{co} {h}x{w} k{k}s{st} B{b}{tag}", dn, cv.conv2d_triton, x,
                                    new(co, ci, k, k), new(co) if has_bias else None, (st, st), (k // 2, k // 2),
                                    allow_tf32=False)
                for (c, h, w) in shapes.unet_upsample_shapes(mc.unet) if mc else [(24, 5, 7)]:
                    x = new(b, c, h, w).to(memory_format=fmt)
                    yield from _run(f"{name} upsample C{c} {h}x{w} B{b}{tag}", dn, ct.conv_transpose2d_triton, x,
                                    new(c, c, 4, 4), new(c), allow_tf32=False)
                for (c, h, w, kind) in shapes.unet_residual_shapes(mc.unet) if mc else [(96, 7, 9, "conv")]:
                    x = new(b, c, h, w).to(memory_format=fmt)
                    yield from _run(f"{name} resadd C{c} {h}x{w} B{b}{tag}", dn, ra.residual_add_triton, x, new(c),
                                    torch.empty_like(x), new(c) if kind == "conv" else None)
            yield from _run(f"{name} temb E{e} B{b}", dn, te._launch, Recorder(te._time_embedding_kernel),
                            new(b, dtype=torch.long), new(e, e // 4), new(e), new(e, e), new(e), new(b, e))


def _run(label, dn, fn, *args, **kw):
    Recorder.log.clear()
    fn(*args, **kw)
    for launch in list(Recorder.log):
        yield label, dn, launch


# --- specialisation and compilation ----------------------------------------------------------------
def as_pointer(t):
    """A tensor as the JIT sees it: a dtype and an address. A meta tensor has no address; the caching
    allocator's blocks are 512-byte aligned, so the view's byte offset decides the 16-byte hint."""
    addr = t.storage_offset() * t.element_size()
    return types.SimpleNamespace(dtype=t.dtype, data_ptr=lambda: addr)


def specialise(kernel, args, kw, backend):
    """The (signature, constexprs, attrs, options) JITFunction.run would compile for this launch."""
    args = [as_pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    kw = dict(kw, debug=False)
    kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, sig, consts, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    return sig, consts, attrs, options


def compile_one(kernel, sig, consts, attrs, options, target):
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - any compiler error is a result to report
        return dict(ok=False, error=f"{type(exc).__name__}: {exc}".strip()[:2000])
    text = log.getvalue()
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return dict(ok=True, regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                shared=ck.metadata.shared)


def short_config(tiles):
    return " ".join(f"{k.replace('BLOCK_', '')}={int(v) if isinstance(v, bool) else v}" for k, v in tiles.items())


def check(args):
    target = GPUTarget("cuda", args.arch, 32)
    backend = make_backend(target)
    configs = {}  # one compile per distinct specialisation (divisibility hints too only with --all-hints)
    for label, dn, (kernel, largs, kw) in record_all(args.batches, args.dtypes):
        if args.kernels and not any(k in kernel.fn.__name__ for k in args.kernels.split(",")):
            continue
        sig, consts, attrs, options = specialise(kernel, largs, kw, backend)
        named = {kernel.arg_names[k[0]]: v for k, v in consts.items()}
        key = repr((kernel.fn.__name__, sorted(sig.items()), sorted(consts.items()), options.num_warps,
                    options.num_stages, sorted(attrs.items()) if args.all_hints else None))
        if key not in configs:
            declared = {p.name for p in kernel.params if p.is_constexpr}
            tiles = {k: v for k, v in named.items() if k in declared}  # the kernel's own constexprs
            ones = ",".join(k for k in named if k not in tiles)  # int args the JIT fixed at 1
            configs[key] = dict(kernel=kernel.fn.__name__, dtype=dn, config=short_config(tiles), spec=ones,
                                launch=f"w{options.num_warps}s{options.num_stages}", used_by=[],
                                compile=(kernel, sig, consts, attrs, options))
        configs[key]["used_by"].append(label)
    rows = list(configs.values())
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, {args.sms} SMs: "
          f"{len(rows)} distinct kernel specialisations", flush=True)
    for r in rows:
        t0 = time.time()
        r.update(compile_one(*r.pop("compile"), target), secs=round(time.time() - t0, 2))
        r["problems"] = ([] if r["ok"] else ["COMPILE"]) + (["SMEM>227K"] if r.get("shared", 0) > H100_SMEM else [])
        r["warnings"] = ["SPILL"] if r.get("spill_st") else []
        if not r["ok"]:
            print(f"FAILED {r['kernel']} {r['dtype']} {r['config']}: {r['error']}", flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    bad = [r for r in rows if r["problems"] or (args.strict and r["warnings"])]
    spills = sum(1 for r in rows if r["warnings"])
    print(f"{len(rows) - len(bad)}/{len(rows)} configs pass ({sum(r['ok'] for r in rows)} compiled, "
          f"{spills} of them spill)" + (f"; {len(bad)} FAIL" if bad else ""))
    return 1 if bad else 0


COLUMNS = f"{'kernel':25} {'dtype':5} {'config (constexprs)':46} {'=1 args':24} {'launch':6}"


def row_key(r):
    return r["kernel"], r["dtype"], r["config"], r["spec"], r["launch"]


def row_head(key):
    return f"{key[0][:25]:25} {key[1]:5} {key[2][:46]:46} {key[3][:24]:24} {key[4]:6}"


def row_cell(r):
    if r is None:
        return "absent"
    spill = f"{r.get('spill_st', '-')}/{r.get('spill_ld', '-')}"
    return f"{'ok' if r['ok'] else 'FAIL':4} {r.get('regs') or '-':>4} {spill} {r.get('shared', '-'):>6}"


def print_table(rows):
    print(f"{COLUMNS} ok   regs spill     smem  used by (first, count)")
    for r in sorted(rows, key=row_key):
        print(f"{row_head(row_key(r))} {row_cell(r):25} {r['used_by'][0]} ({len(r['used_by'])})"
              + "".join(" " + p for p in r["problems"] + r["warnings"]))


def compare(a_path, b_path):
    """One line per config present in either run: ok, regs, spills (store/load bytes), smem side by side."""
    runs = [json.load(open(p)) for p in (a_path, b_path)]
    index = [{row_key(r): r for r in run["rows"]} for run in runs]
    print(f"{COLUMNS} | {runs[0]['triton']:25} | {runs[1]['triton']}")
    for key in sorted(set(index[0]) | set(index[1]), key=str):
        print(f"{row_head(key)} | {row_cell(index[0].get(key)):25} | {row_cell(index[1].get(key))}")
    return 0 if all(r["ok"] for idx in index for r in idx.values()) and index[0].keys() == index[1].keys() else 1


def main():
    global H100_SMS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,3,16,64,256", help="batch sizes to plan for (comma-separated)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--sms", type=int, default=H100_SMS, help="SM count the launchers plan for")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = H100)")
    ap.add_argument("--kernels", help="only kernels whose name contains one of these (comma-separated)")
    ap.add_argument("--all-hints", action="store_true",
                    help="also compile each set of divisibility hints separately (as the JIT cache does)")
    ap.add_argument("--strict", action="store_true", help="count register spills as failures too")
    ap.add_argument("--json", help="also write the rows here (for --compare)")
    ap.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    H100_SMS = args.sms
    return check(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(_CACHE, ignore_errors=True)
