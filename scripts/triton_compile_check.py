#!/usr/bin/env python3
"""Compile every Triton kernel of ddpm_fast.ops ahead of time for an H100 (sm_90), without a GPU.

    python scripts/triton_compile_check.py [--batches 1,3,16,64,256] [--json out.json] [--arch 90]
    python scripts/triton_compile_check.py --compare a.json b.json     (join two runs' tables)

Why: the kernels run under the CPU interpreter in the tests, which checks the math but not whether
Triton's GPU compiler accepts them (type rules, layouts, shared memory) in the installed version.

How: the real launchers (groupnorm_swish_triton, attention_triton, time_embedding's _launch) are
called on meta-device tensors of the presets' layer shapes (read off a meta-device UNet), with
their kernel launches recorded instead of run; the device queries are replaced by an H100's answers
(132 SMs, a CUDA device for the dot flags). Each recorded launch is then specialised exactly as
JITFunction.run would (the JIT's own binder: ints equal to 1 become constants, 16-divisible ints and
16-byte-aligned pointers get divisibility hints) and compiled to a cubin with triton.compile for
GPUTarget("cuda", arch, 32). ptxas's log gives registers and spills; metadata.shared the shared memory.
Uses Triton internals (create_function_from_signature, JITFunction._pack_args) present in 3.6 to 3.9.
Exit status 1 if any config fails to compile or needs more shared memory than an H100 block may
have (227 KB: the launch would fail); spills are flagged (SPILL), and fail only with --strict.
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import types

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even if a test shell left it on
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_cc_")  # fresh: every kernel compiles
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

H100_SMS = 132
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


_plan, _dot_flags = gn.plan, att._dot_flags
gn._launch = lambda kernel, grid, args, meta, num_warps: Recorder(kernel)[grid](*args, **meta, num_warps=num_warps)
gn.plan = lambda b, c, hw, g, cl, sms, *a: _plan(b, c, hw, g, cl, H100_SMS if sms is None else sms, *a)
att.wrap_triton = Recorder
att._programs_wanted = lambda device: H100_SMS
att._dot_flags = lambda dtype, device: _dot_flags(dtype, torch.device("cuda"))


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
        for dn in dtypes:
            dt = DTYPES[dn]
            for b in batches:
                for (c, h, w, g, has_add, swish) in norms:
                    for cl in (False, True):
                        x = torch.empty(b, c, h, w, dtype=dt, device=META)
                        x = x.to(memory_format=torch.channels_last) if cl else x
                        wt, bs = torch.empty(c, dtype=dt, device=META), torch.empty(c, dtype=dt, device=META)
                        add = torch.empty(b, c, dtype=dt, device=META) if has_add else None
                        yield from _run(f"{name} gn C{c} {h}x{w} G{g} B{b}{' CL' if cl else ''}", dn,
                                        gn.groupnorm_swish_triton, x, wt, bs, g, add=add, swish=swish)
                for (c, h, w, nh, dk) in attns:
                    for cl in (False, True):
                        x = torch.empty(b, c, h, w, dtype=dt, device=META)
                        x = x.to(memory_format=torch.channels_last) if cl else x
                        p = [torch.empty(s, dtype=dt, device=META) for s in
                             ((3 * nh * dk, c), (3 * nh * dk,), (c, nh * dk), (c,))]
                        for tf32 in ((False, True) if dt == torch.float32 else (False,)):
                            torch.backends.cuda.matmul.allow_tf32 = tf32
                            yield from _run(f"{name} attn C{c} {h}x{w} h{nh} dk{dk} B{b}{' CL' if cl else ''}"
                                            f"{' tf32' if tf32 else ''}", dn, att.attention_triton, x, *p, nh, dk)
                        torch.backends.cuda.matmul.allow_tf32 = False
                t = torch.empty(b, dtype=torch.long, device=META)
                ws = [torch.empty(s, dtype=dt, device=META) for s in ((e, e // 4), (e,), (e, e), (e,))]
                yield from _run(f"{name} temb E{e} B{b}", dn, te._launch, Recorder(te._time_embedding_kernel),
                                t, *ws, torch.empty(b, e, dtype=dt, device=META))


def _run(label, dn, fn, *args, **kw):
    Recorder.log.clear()
    fn(*args, **kw)
    for launch in list(Recorder.log):
        yield label, dn, launch


# --- specialisation and compilation ----------------------------------------------------------------
class Ptr:
    """A tensor argument as the JIT sees it: a dtype and an address (a meta tensor has none; the
    caching allocator's blocks are 512-byte aligned, so the address is the view's byte offset)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._addr = t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._addr


def specialise(kernel, args, kw, backend):
    """The (signature, constexprs, attrs, options) JITFunction.run would compile for this launch."""
    args = [Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
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
    abbrev = {"BLOCK_": "", "True": "1", "False": "0"}
    text = " ".join(f"{k}={v}" for k, v in tiles.items())
    for a, b in abbrev.items():
        text = text.replace(a, b)
    return text


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
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}: "
          f"{len(rows)} distinct kernel specialisations", flush=True)
    for i, r in enumerate(rows):
        t0 = time.time()
        r.update(compile_one(*r.pop("compile"), target), secs=round(time.time() - t0, 2))
        if args.progress and i % 25 == 24:
            print(f"  compiled {i + 1}/{len(rows)}", file=sys.stderr, flush=True)
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
          f"{spills} spill registers)" + (f"; {len(bad)} FAIL" if bad else ""))
    return 1 if bad else 0


def print_table(rows):
    print(f"{'kernel':25} {'dtype':5} {'config (constexprs)':46} {'=1 args':18} {'launch':6} {'ok':4} {'regs':>4} "
          f"{'spill':>7} {'smem':>6} {'secs':>5}  used by (first, count)")
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["config"], r["spec"], r["launch"])):
        spill = f"{r.get('spill_st')}/{r.get('spill_ld')}" if r["ok"] else "-"
        print(f"{r['kernel'][:25]:25} {r['dtype']:5} {r['config'][:46]:46} {r['spec'][:18]:18} {r['launch']:6} "
              f"{'ok' if r['ok'] else 'FAIL':4} {r.get('regs') or '-':>4} {spill:>7} {r.get('shared', '-'):>6} "
              f"{r['secs']:5.1f}  {r['used_by'][0]} ({len(r['used_by'])})"
              f"{''.join(' ' + p for p in r['problems'] + r.get('warnings', []))}")


def compare(a_path, b_path):
    """One line per config present in either run: ok, regs, spills, smem side by side."""
    runs = [json.load(open(p)) for p in (a_path, b_path)]
    index = [{(r["kernel"], r["dtype"], r["config"], r["spec"], r["launch"]): r for r in run["rows"]} for run in runs]
    cell = lambda r: "absent" if r is None else (  # noqa: E731
        f"{'ok' if r['ok'] else 'FAIL'} {r.get('regs')} {r.get('spill_st')}/{r.get('spill_ld')} {r.get('shared')}")
    print(f"{'kernel':25} {'dtype':5} {'config':46} {'=1 args':18} {'launch':6} | "
          f"{runs[0]['triton'] + ': ok regs spill smem':26} | {runs[1]['triton']}: ok regs spill smem")
    for key in sorted(set(index[0]) | set(index[1]), key=str):
        ra, rb = index[0].get(key), index[1].get(key)
        print(f"{key[0][:25]:25} {key[1]:5} {key[2][:46]:46} {key[3][:18]:18} {key[4]:6} | {cell(ra):26} | {cell(rb)}")
    return 0 if all(r["ok"] for idx in index for r in idx.values()) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,3,16,64,256", help="batch sizes to plan for (comma-separated)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = H100)")
    ap.add_argument("--kernels", help="only kernels whose name contains one of these (comma-separated)")
    ap.add_argument("--all-hints", action="store_true",
                    help="also compile each set of divisibility hints separately (as the JIT cache does)")
    ap.add_argument("--strict", action="store_true", help="count register spills as failures too")
    ap.add_argument("--progress", action="store_true", help="report progress on stderr")
    ap.add_argument("--json", help="also write the rows here (for --compare)")
    ap.add_argument("--compare", nargs=2, metavar=("A_JSON", "B_JSON"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
