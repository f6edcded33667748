"""What the tests share besides fixtures: the devices and dtypes the op tests run on, their ids, the
NHWC layout, output poisoning and a check that a compiled graph really holds an op. Imported as
`from helpers import ...` (conftest.py is pytest's, not a module to import from)."""
import torch

HAS_CUDA = torch.cuda.is_available()

# Devices the op tests run on: the CPU (through the Triton interpreter) always, CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# The dtypes every fast op supports, their short test ids, and the NHWC layout the op tests also run.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CL = torch.channels_last


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so an element the kernel never wrote fails the comparison."""
    return t.fill_(float("nan"))


def compile_recording(fn):
    """torch.compile(fn, fullgraph=True), recording the call targets of the graph dynamo captures before
    handing it to aot_eager: returns (compiled fn, set of target names such as
    'ddpm_fast.conv2d'), so a compile test can assert that the fused op itself is in the graph
    (a triton_op is later decomposed into its body by AOTAutograd, which is why dynamo's graph is read)."""
    from torch._dynamo.backends.registry import lookup_backend

    seen = set()
    aot_eager = lookup_backend("aot_eager")

    def record(gm, example_inputs):
        seen.update(str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function")
        return aot_eager(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=record), seen


def require_cpp_kernel(monkeypatch, op_module) -> None:
    """For the C++ CPU-kernel tests: fail (never skip) without the kernel, and poison the op's outputs."""
    import pytest

    if op_module._CPP_OUT is None:
        pytest.fail("the C++ CPU kernel is not available (build ddpm_fast._C: python setup.py build_ext --inplace)")
    real = op_module._new_output
    monkeypatch.setattr(op_module, "_new_output", lambda x: poison(real(x)))


def install_stand_in_capture(monkeypatch) -> list:
    """fast_loop's graph path on CPU: `capture` is replaced by an eager stand-in whose "replay" runs the
    step on the state's static buffers with the net as it was at capture (fused, with the time table
    of that moment), as a captured graph would. Returns the list of captured states (one per capture)."""
    import types
    import weakref

    import ddpm_fast
    import ddpm_fast.sampling.fast_loop as fs

    captured = []

    def graphed(state):
        captured.append(state)
        # Weakly, as a real graph holds no Python reference to the module (fast_loop drops state.net).
        net_ref, table, was_fused = weakref.ref(state.net), state.net.time_table, ddpm_fast.ops.is_fused(state.net)

        def replay():
            net = net_ref()
            now_table, now_fused = net.time_table, ddpm_fast.ops.is_fused(net)
            net.time_table = table
            if was_fused:
                ddpm_fast.ops.fused(net)
            held, state.net = state.net, net
            try:
                state.step()
            finally:
                state.net = held
                net.time_table = now_table
                if not now_fused:
                    ddpm_fast.ops.unfused(net)

        state.graph = types.SimpleNamespace(replay=replay)
        return replay

    monkeypatch.setattr(fs, "capture", graphed)
    monkeypatch.setattr(fs, "_GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(fs, "EXTENSION_HAS_CUDA", True)
    return captured


def use_namespace(model, namespace):
    """Point every block's op namespace `F` at `namespace` (e.g. the raw Triton launchers); returns the model."""
    for m in model.modules():
        if hasattr(m, "F"):
            m.F = namespace
    return model
