"""The main job (`make sample`: shipped digits16 model, 16 images, DDPM-1000) on CPU, providers interleaved.

    PYTHONPATH=$PWD python scripts/cpu_main_job.py STEPS REPS PROVIDER[,PROVIDER...] [OUT.json]

PROVIDER = BACKEND-DTYPE[-cl][-fuse|-nofuse][-split|-nosplit][-prog|-noprog], e.g. reference-fp32, fast-fp32,
fast-bf16-cl, fast-fp32-nofuse: sample() with that backend, dtype and channels_last; -fuse / -nofuse
override fast_loop's `fuse` default (cpu_fuses), -split / -nosplit its `cpu_split` default
(cpu_split.split_parts), -prog / -noprog its `cpu_program` default, for comparison. Every round calls each provider once (so load
from other jobs hits all alike); prints each round and the medians, and writes the times to OUT.json.
Times are sample() wall clock (x_T to images; the model is loaded once). Results:
benchmarks/results/cpu-2026-12-02-main-job.md.
"""
import json
import statistics
import sys
import time

import torch

import ddpm_fast.sampling.fast_loop as fast_loop_mod
from ddpm_fast.io.checkpoint import default_checkpoint_path, load_checkpoint
from ddpm_fast.sampling import sample


def run(model, config, prov, steps):
    backend, dtype, *flags = prov.split("-")
    defaults = fast_loop_mod.fast_loop.__kwdefaults__
    defaults["fuse"] = True if "fuse" in flags else False if "nofuse" in flags else None
    defaults["cpu_split"] = True if "split" in flags else False if "nosplit" in flags else None
    defaults["cpu_program"] = True if "prog" in flags else False if "noprog" in flags else None
    t0 = time.perf_counter()
    out = sample(model, batch_size=16, num_inference_steps=steps, sampler="ddpm",
                 generator=torch.Generator().manual_seed(0), output_type="pt", progress=False, backend=backend,
                 dtype=dtype, config=config, channels_last="cl" in flags)
    return time.perf_counter() - t0, out


def main():
    steps, reps, provs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    model, config = load_checkpoint(default_checkpoint_path())
    print("threads", torch.get_num_threads(), "capability", torch.backends.cpu.get_cpu_capability(), flush=True)
    times = {p: [] for p in provs}
    try:
        for r in range(reps):
            for p in provs:
                times[p].append(run(model, config, p, steps)[0])
            print(r, {p: round(v[-1], 2) for p, v in times.items()}, flush=True)
    finally:
        fast_loop_mod.fast_loop.__kwdefaults__.update(fuse=None, cpu_split=None, cpu_program=None)
    base = statistics.median(times[provs[0]])
    for p in provs:
        m = statistics.median(times[p])
        print(f"{p}: median {m:.2f} s, {base / m:.2f}x {provs[0]}")
    if len(sys.argv) > 4:
        with open(sys.argv[4], "w") as f:
            json.dump({"steps": steps, "times_s": times, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
