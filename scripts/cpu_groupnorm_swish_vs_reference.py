"""groupnorm_swish (the op wrapper, C++ kernel) against the reference composition on CPU, paired calls.

    PYTHONPATH=$PWD python scripts/cpu_groupnorm_swish_vs_reference.py [OUT.json]

For fp32 and bf16, channels_last and NCHW, and the digits16 / cifar35m layer shapes at batch 1 and 16
(G = 8, with the time add and Swish, as the UNet calls it): the fused op and `reference.functional`'s
group_norm + add + sigmoid + mul are called alternately (200 pairs; 60 for the 2M-element shapes), so
drift hits both alike; prints a markdown row per case with both medians and the ratio. At the largest
shapes the reference's memory passes evict the caches the fused call then reads from: those rows time
the op on cold caches (PERF_NOTES.md, "CPU session 6"). Torch's default threads.
"""
import json
import statistics
import sys
import time

import torch

from ddpm_fast import ops
from ddpm_fast.reference import functional as ref

SHAPES = [(16, 32, 16, 16), (16, 64, 16, 16), (16, 128, 8, 8), (16, 128, 4, 4), (16, 256, 4, 4), (1, 32, 16, 16),
          (1, 64, 16, 16), (1, 128, 4, 4), (16, 128, 32, 32), (16, 256, 16, 16), (1, 128, 32, 32), (1, 256, 8, 8)]


def paired(f, g, n):
    for _ in range(10):
        f(), g()
    a, b = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        t1 = time.perf_counter()
        g()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a) * 1e6, statistics.median(b) * 1e6


def main():
    rows = []
    print("| dtype | layout | shape | fused (us) | reference (us) | ratio |\n|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for cl in (True, False):
            for s in SHAPES:
                x = torch.randn(s, dtype=dt)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                w, b, a = torch.randn(s[1]), torch.randn(s[1]), torch.randn(s[0], s[1], dtype=dt)
                wd, bd = w.to(dt), b.to(dt)
                fused, reference = paired(lambda: ops.groupnorm_swish(x, w, b, 8, 1e-5, a, True),
                                          lambda: ref.groupnorm_swish(x, wd, bd, 8, 1e-5, a, True),
                                          60 if x.numel() > 1e6 else 200)
                rows.append((str(dt).split(".")[1], "cl" if cl else "nchw", "x".join(map(str, s)), round(fused, 1),
                             round(reference, 1), round(reference / fused, 2)))
                print("| %s | %s | %s | %.1f | %.1f | %.2fx |" % rows[-1], flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
