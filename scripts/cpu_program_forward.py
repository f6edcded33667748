"""The shipped digits16 UNet's forward on CPU as the fast sampler runs it, eager against a CPU program.

    PYTHONPATH=$PWD python scripts/cpu_program_forward.py THREADS BATCH fp32[,bf16] cl|nchw [ROUNDS]

Four providers, each the model as `fast_loop` prepares it (time table attached; the fused ones inside the
conv-packing scope, as on CPU): ref-eager and fused-eager (the reference / fused UNet called as a module),
ref-prog and fused-prog (the same models' forwards recorded once by ops.record_cpu_program and replayed).
Two warm-up calls each, then ROUNDS rounds (default 80) calling every provider once, in alternating
order, under inference mode; prints medians and the ratio to ref-eager. Results:
benchmarks/results/cpu-2026-12-04-program-fuse.md.
"""
import contextlib
import copy
import statistics
import sys
import time

import torch

from ddpm_fast import ops
from ddpm_fast.io.checkpoint import default_checkpoint_path, load_checkpoint
from ddpm_fast.sampling.fast_loop import _fast_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def providers(model, x, t, dtype, cl, stack):
    runs = {}
    for fuse in (False, True):
        # A copy each (where no conversion is needed _fast_model fuses the model it is given, in place), made
        # outside inference mode: weights made inside it are inference tensors, which are neither packed nor
        # recorded (no version counter), as fast_loop's own converted copies are not.
        with torch.inference_mode(False):
            own = copy.deepcopy(model)
        net = stack.enter_context(_fast_model(own, dtype, torch.device("cpu"), 1000, fuse=fuse, table=True,
                                              channels_last=cl))
        net(x, t)
        net(x, t)  # the packing cache fills on first use
        _, program = ops.record_cpu_program(net, (x, t), list(net.parameters()))
        name = "fused" if fuse else "ref"
        runs[f"{name}-eager"] = lambda net=net: net(x, t)
        runs[f"{name}-prog"] = lambda program=program: program(x, t)
    return runs


def main():
    torch.set_num_threads(int(sys.argv[1]))
    batch, cl = int(sys.argv[2]), sys.argv[4] == "cl"
    rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 80
    model, _ = load_checkpoint(default_checkpoint_path())
    for name in sys.argv[3].split(","):
        dtype = DTYPES[name]
        x = torch.randn(batch, 1, 16, 16).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        t = torch.full((batch,), 500, dtype=torch.long)
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            runs = providers(model, x, t, dtype, cl, stack)
            times = {k: [] for k in runs}
            for i in range(rounds):
                for k, fn in (runs.items() if i % 2 else reversed(list(runs.items()))):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["ref-eager"])
        row = {k: f"{statistics.median(v) * 1e3:.3f} ms ({base / statistics.median(v):.2f}x)" for k, v in times.items()}
        print(name, "batch", batch, "cl" if cl else "nchw", "threads", torch.get_num_threads(), row, flush=True)


if __name__ == "__main__":
    main()
