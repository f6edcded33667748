"""UNet forward on CPU: reference vs fused ops, NCHW vs channels_last, in one interleaved run.

    PYTHONPATH=$PWD python scripts/cpu_unet_forward.py PRESET[,PRESET] BATCH[,BATCH] [REPS] [fp32|bf16] [PROVIDERS]

PROVIDERS (comma-separated, default all four): ref-nchw, fused-nchw, ref-cl, fused-cl. Each is a deep copy
of one model (fixed random weights) with the precomputed time table attached, as the fast sampler runs
the UNet (TABLE=0 leaves it off); two warm-up calls each, then REPS rounds that call every provider once,
so a load spike from another job hits all of them; prints medians and the ratio to the first provider.
Torch's default threads (both cores of the dev VM). Results: benchmarks/results/cpu-2026-12-02-unet.md.
"""
import copy
import os
import statistics
import sys
import time

import torch

from ddpm_fast import ops
from ddpm_fast.config import PRESETS
from ddpm_fast.reference.unet import UNet
from ddpm_fast.sampling.time_table import attach_time_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def providers(base, x, t, names, table):
    runs = {}
    for name in names:
        m = copy.deepcopy(base)
        if name.startswith("fused"):
            ops.fused(m)
        cl = name.endswith("cl")
        if cl:
            m = m.to(memory_format=torch.channels_last)
        if table:
            with torch.inference_mode():
                attach_time_table(m, 1000)
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        runs[name] = lambda m=m, xx=xx: m(xx, t)
    return runs


def main():
    presets, batches = sys.argv[1].split(","), [int(b) for b in sys.argv[2].split(",")]
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    dt = DTYPES[sys.argv[4] if len(sys.argv) > 4 else "fp32"]
    names = (sys.argv[5] if len(sys.argv) > 5 else "ref-nchw,fused-nchw,ref-cl,fused-cl").split(",")
    print("threads", torch.get_num_threads(), "capability", torch.backends.cpu.get_cpu_capability())
    for p in presets:
        cfg = PRESETS[p].unet
        torch.manual_seed(0)
        base = UNet(cfg).eval().to(dt)
        for b in batches:
            x = torch.randn(b, cfg.image_channels, cfg.image_size, cfg.image_size).to(dt)
            t = torch.randint(0, 1000, (b,))
            runs = providers(base, x, t, names, os.environ.get("TABLE", "1") == "1")
            times = {k: [] for k in runs}
            with torch.inference_mode():
                for fn in runs.values():
                    fn(), fn()
                for _ in range(reps):
                    for k, fn in runs.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            first = med[names[0]]
            print(p, sys.argv[4] if len(sys.argv) > 4 else "fp32", "b", b,
                  " ".join(f"{k}={v:.2f}ms({first / v:.2f}x)" for k, v in med.items()), flush=True)


if __name__ == "__main__":
    main()
