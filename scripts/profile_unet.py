"""Where a UNet forward's GPU time goes: per-kernel CUDA time of the reference and the fused model.

    python scripts/profile_unet.py --preset cifar35m --batch 1 64 --dtype bf16 fp32 [--top 12] [--channels-last]
        [--json profile.json] [--device cpu]

For every (preset, dtype, batch) and provider it warms up, then profiles `--iters` forwards with
torch.profiler and prints: wall time per forward, summed kernel time per forward (GPU busy time; the gap
to wall time is launch/host overhead), the kernel count, the time and kernel count per forward by kind
(conv, norm, attention, time, gemm, elementwise, layout, other: KINDS below), and the `--top` kernels by
total time. Providers: reference; fast (fused ops, computed time path); fast+table (fused ops with the
precomputed time table, as the sampler runs the UNet); with --channels-last, also fast+table+nhwc
(activations and conv weights in channels_last, the sampler's channels_last=True). --json writes the
same per case (rewritten after each, so a run stopped by a deadline keeps what it measured).
--device cpu profiles CPU ops (their self time) instead of kernels: the CPU profile (the C++ kernels
ddpm_fast::groupnorm_swish_out / residual_add_out count as norm / elementwise), and the dry run of this
script's plumbing (scripts/gpu_check.sh with GPU_CHECK_REQUIRE_CUDA=0), not a measurement of the GPU.
This is the tool that decides what to optimise next; the numbers that get reported come from
benchmarks/ (pytest-benchmark, CUDA events).
"""
import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the fast ops' Triton kernels on CPU tensors need the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_fast import ops  # noqa: E402
from ddpm_fast.config import PRESETS  # noqa: E402
from ddpm_fast.sampling.time_table import attach_time_table, detach_time_table  # noqa: E402
from ddpm_fast.reference import UNet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Kernel kinds, first match wins (name patterns of cuDNN, cuBLAS, ATen and this package's kernels; the
# aten:: names are the CPU dry run's ops), so a forward's time can be read by kind: e.g. "conv"
# before and after a change to the convolutions.
KINDS = [
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw")),
    ("conv", re.compile(r"_conv_gemm|_upsample_gemm|_split_sum|fprop|dgrad|fft|pointwise_mult_and_sum_complex"
                        r"|flip_filter|gemv2T|cudnn|aten::.*conv")),
    ("norm", re.compile(r"_gn_|RowwiseMoments|ComputeFusedParams|group_norm|groupnorm_swish")),
    ("attention", re.compile(r"_flash|_out_proj|fmha|attention|softmax|aten::bmm|aten::baddbmm")),
    ("time", re.compile(r"_time_embedding")),
    ("gemm", re.compile(r"gemm|gemv|nvjet|sgemm|aten::(addmm|mm|linear)$")),
    ("elementwise", re.compile(r"elementwise|residual_add|reverse_step|Cat|copy|reduce"
                               r"|aten::(add|mul|sub|div|silu|sigmoid|cat|copy_|fill_)_?$")),
]


def kind_of(name: str) -> str:
    return next((k for k, pat in KINDS if pat.search(name)), "other")


def kernel_table(events, iters, device_type) -> dict:
    """{kernel name: [total us per forward, launches per forward]} from profiler events. CUDA: the device
    events (kernels; memcpy/memset count too, as they occupy the GPU). CPU: every op's self time (the
    time not spent in the ops it calls, so nothing counts twice)."""
    per = defaultdict(lambda: [0.0, 0.0])
    for ev in events:
        if device_type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time
        else:
            if ev.device_type != torch.autograd.DeviceType.CPU:
                continue
            us = ev.self_cpu_time_total
        per[ev.name][0] += us / iters
        per[ev.name][1] += 1 / iters
    return dict(per)


def by_kind(table) -> dict:
    """{kind: [us per forward, kernels per forward]} of a kernel_table."""
    out = defaultdict(lambda: [0.0, 0.0])
    for name, (us, count) in table.items():
        acc = out[kind_of(name)]
        acc[0] += us
        acc[1] += count
    return dict(out)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def profile_one(model, x, t, iters, device):
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU
    with torch.no_grad():
        for _ in range(3):
            model(x, t)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x, t)
        _sync(device)
        wall_us = (time.perf_counter() - t0) / iters * 1e6
        with profile(activities=[activity]) as prof:
            for _ in range(iters):
                model(x, t)
            _sync(device)
    return wall_us, kernel_table(prof.events(), iters, device)


def summarize(wall_us, table) -> dict:
    """The JSON record of one profile: wall, kernel time and count per forward, by kind, top kernels."""
    kinds = by_kind(table)
    return {"wall_us": wall_us, "kernel_us": sum(v[0] for v in table.values()),
            "kernels": sum(v[1] for v in table.values()),
            "by_kind": {k: {"us": us, "kernels": n} for k, (us, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
            "top": [{"name": name, "us": us, "launches": n}
                    for name, (us, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:50]]}


def print_record(case, rec, top):
    unit = "kernels" if rec.get("device", "cuda") == "cuda" else "CPU ops (self time)"
    print(f"\n== {case}: wall {rec['wall_us']:.0f} us/forward, {unit} {rec['kernel_us']:.0f} us "
          f"({rec['kernels']:.0f} launches)")
    print("   by kind: " + ", ".join(f"{k} {v['us']:.0f} us/{v['kernels']:.0f}" for k, v in rec["by_kind"].items()))
    for row in rec["top"][:top]:
        print(f"  {row['us']:9.1f} us  {row['launches']:5.0f}x  {row['name'][:110]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["cifar35m"], choices=sorted(PRESETS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--channels-last", action="store_true", help="also profile the fused UNet in channels_last")
    ap.add_argument("--json", type=Path, help="write every profile's numbers here (JSON)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: profile CPU ops (a plumbing dry run; says nothing about the GPU)")
    args = ap.parse_args(argv)
    if args.iters < 1 or any(b < 1 for b in args.batch):
        ap.error("--iters and --batch must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --device cpu for a dry run of the script)")
    if args.device == "cpu" and any(d != "fp32" for d in args.dtype):
        ap.error("--device cpu profiles fp32 only")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = args.device
    records = {}
    for preset in args.preset:
        cfg = PRESETS[preset]
        for dt in args.dtype:
            torch.manual_seed(0)
            model = UNet(cfg.unet).eval().to(dev, DTYPES[dt])
            for batch in args.batch:
                x = torch.randn(batch, cfg.unet.image_channels, cfg.unet.image_size, cfg.unet.image_size,
                                device=dev, dtype=DTYPES[dt])
                t = torch.randint(0, cfg.diffusion.n_steps, (batch,), device=dev)
                providers = ["reference", "fast", "fast+table"] + (["fast+table+nhwc"] if args.channels_last else [])
                for provider in providers:
                    (ops.fused if provider != "reference" else ops.unfused)(model)
                    fmt = torch.channels_last if provider.endswith("nhwc") else torch.contiguous_format
                    model.to(memory_format=fmt)
                    if "table" in provider:
                        attach_time_table(model, cfg.diffusion.n_steps)
                    wall, table = profile_one(model, x.contiguous(memory_format=fmt), t, args.iters, dev)
                    detach_time_table(model)
                    case = f"{preset} b={batch} {dt} {provider}"
                    records[case] = dict(summarize(wall, table), device=dev, preset=preset, batch=batch,
                                         dtype=dt, provider=provider, iters=args.iters)
                    print_record(case, records[case], args.top)
                    if args.json:
                        args.json.write_text(json.dumps(records, indent=1))
                model.to(memory_format=torch.contiguous_format)
                ops.unfused(model)


if __name__ == "__main__":
    main()
