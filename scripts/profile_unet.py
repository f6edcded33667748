"""Where a UNet forward's GPU time goes: per-kernel CUDA time of the reference and the fused model.

    python scripts/profile_unet.py --preset cifar35m --batch 1 64 --dtype fp32 bf16 [--top 15] [--channels-last]

For every (preset, batch, dtype) and provider it warms up, then profiles
`--iters` forwards with torch.profiler and prints: wall time per forward, summed kernel time per
forward (GPU busy time; the gap to wall time is launch/host overhead), the kernel count, and the
`--top` kernels by total time. Providers: reference; fast (fused ops, computed time path); fast+table
(fused ops with the precomputed time table, as the sampler runs the UNet); with --channels-last, also
fast+table+nhwc (activations and conv weights in channels_last, the sampler's channels_last=True). This is the tool that decides what to optimise next; the numbers
that get reported come from benchmarks/ (pytest-benchmark, CUDA events).
"""
import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_fast import ops  # noqa: E402
from ddpm_fast.config import PRESETS  # noqa: E402
from ddpm_fast.sampling.time_table import attach_time_table, detach_time_table  # noqa: E402
from ddpm_fast.reference import UNet  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kernel_table(prof, iters):
    """{kernel name: (total us per forward, launches per forward)} from the profiler's device events."""
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time / iters
            per[ev.name][1] += 1 / iters
    return per


# Kernel kinds, first match wins (name patterns of cuDNN, cuBLAS, ATen and this package's kernels), so a
# forward's time can be read by kind: e.g. "conv" before and after a change to the convolutions.
KINDS = [
    ("layout", re.compile(r"nchwToNhwc|nhwcToNchw")),
    ("conv", re.compile(r"_conv_gemm|_upsample_gemm|_split_sum|fprop|dgrad|fft|pointwise_mult_and_sum_complex"
                        r"|flip_filter|gemv2T|cudnn")),
    ("norm", re.compile(r"_gn_|RowwiseMoments|ComputeFusedParams|group_norm")),
    ("attention", re.compile(r"_flash|_out_proj|fmha|attention|softmax")),
    ("time", re.compile(r"_time_embedding")),
    ("gemm", re.compile(r"gemm|gemv|nvjet|sgemm")),
    ("elementwise", re.compile(r"elementwise|_residual_add|reverse_step|Cat|copy|reduce")),
]


def by_kind(table) -> dict:
    out = defaultdict(float)
    for name, (us, _) in table.items():
        out[next((k for k, pat in KINDS if pat.search(name)), "other")] += us
    return out


def profile_one(model, x, t, iters):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(x, t)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x, t)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) / iters * 1e6
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                model(x, t)
            torch.cuda.synchronize()
    return wall_us, kernel_table(prof, iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["cifar35m"], choices=sorted(PRESETS))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--channels-last", action="store_true", help="also profile the fused UNet in channels_last")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_unet.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for preset in args.preset:
        cfg = PRESETS[preset]
        for dt in args.dtype:
            torch.manual_seed(0)
            model = UNet(cfg.unet).eval().to("cuda", DTYPES[dt])
            for batch in args.batch:
                x = torch.randn(batch, cfg.unet.image_channels, cfg.unet.image_size, cfg.unet.image_size,
                                device="cuda", dtype=DTYPES[dt])
                t = torch.randint(0, cfg.diffusion.n_steps, (batch,), device="cuda")
                providers = ["reference", "fast", "fast+table"] + (["fast+table+nhwc"] if args.channels_last else [])
                for provider in providers:
                    (ops.fused if provider != "reference" else ops.unfused)(model)
                    fmt = torch.channels_last if provider.endswith("nhwc") else torch.contiguous_format
                    model.to(memory_format=fmt)
                    if "table" in provider:
                        attach_time_table(model, cfg.diffusion.n_steps)
                    wall, table = profile_one(model, x.contiguous(memory_format=fmt), t, args.iters)
                    detach_time_table(model)
                    busy = sum(v[0] for v in table.values())
                    n = sum(v[1] for v in table.values())
                    print(f"\n== {preset} b={batch} {dt} {provider}: wall {wall:.0f} us/forward, "
                          f"kernels {busy:.0f} us ({n:.0f} launches)")
                    kinds = sorted(by_kind(table).items(), key=lambda kv: -kv[1])
                    print("   by kind: " + ", ".join(f"{k} {us:.0f} us" for k, us in kinds))
                    for name, (us, cnt) in sorted(table.items(), key=lambda kv: -kv[1][0])[:args.top]:
                        print(f"  {us:9.1f} us  {cnt:5.0f}x  {name[:110]}")
                model.to(memory_format=torch.contiguous_format)
                ops.unfused(model)


if __name__ == "__main__":
    main()
