"""pytest plugin for scripts/gpu_check.sh: run only the tests that run on CUDA, the new work's first.

    PYTHONPATH=scripts python -m pytest -p gpu_check_tests --cuda-tests=new  tests   # NEW_WORK's CUDA tests
    PYTHONPATH=scripts python -m pytest -p gpu_check_tests --cuda-tests=rest tests   # every other CUDA test
    PYTHONPATH=scripts python -m pytest -p gpu_check_tests --cuda-tests=all  tests   # both

A test runs on CUDA when it carries the `gpu` marker or a `device` parameter "cuda" (tests/conftest.py's
DEVICES; the same rule tests/conftest.py's `_runs_on_cuda` applies); everything else is deselected (the
CPU tests are CI's). NEW_WORK names the tests of the work done since the last GPU run (2026-11-26, H100),
per feature, as node-id prefixes; `python scripts/gpu_check_tests.py --check` (and tests/test_gpu_check.py)
reads the test files and fails when an entry no longer names a CUDA test. Without arguments it prints the
feature list; --files, the files it names.
"""
import ast
import sys
from pathlib import Path

# Feature -> node-id prefixes ("file" = its CUDA tests, "file::test" = that test and its parameter sets).
NEW_WORK = {
    "Triton conv2d": ["tests/test_conv2d.py"],
    "Triton conv_transpose2d": ["tests/test_conv_transpose2d.py"],
    "residual_add": ["tests/test_residual_add.py"],
    # The fused UNet on CUDA reads conv1's bias from the time table; the table under graph capture.
    "conv1 bias in the time table": ["tests/test_fused_unet.py::test_fused_unet_matches_reference_cuda",
                                     "tests/test_time_embedding.py::test_table_lookup_under_cuda_graph_capture"],
    "device-memory seed": ["tests/test_reverse_step.py::test_cuda_graph_replay_reads_the_device_seed",
                           "tests/test_reverse_step.py::test_opcheck_cuda"],
    "kept sampling graphs": ["tests/test_fast_sampler.py::test_kept_cuda_graph_serves_a_new_seed_and_x_T",
                             "tests/test_fast_sampler.py::test_cuda_graph_replay_equals_eager"],
    # Plain eager calls skip the dispatcher (every eager CUDA op call above); traced calls keep the op.
    "eager dispatcher bypass": ["tests/test_fused_unet.py::test_compiled_fused_unet_fullgraph_no_recompiles_across_t",
                                "tests/test_groupnorm_swish.py::test_gpu_compile_block",
                                "tests/test_attention.py::test_gpu_torch_compile_fullgraph",
                                "tests/test_time_embedding.py::test_torch_compile_fullgraph_cuda"],
    # Issue 15: the DDPM paper's UNet (diffusers' layout) on the fused path, in every dtype, graphed.
    "DDPM UNet": ["tests/test_fused_ddpm_unet.py"],
    "fp16/bf16 sampler fix": ["tests/test_fast_sampler.py::test_fast_trajectory_within_tolerance_of_reference_cuda",
                              "tests/test_sampling.py::test_cpu_generator_gives_the_same_images_on_cuda"],
}
CHOICES = ("new", "rest", "all")


def new_work_prefixes():
    return [p for prefixes in NEW_WORK.values() for p in prefixes]


def new_work_files():
    return sorted({p.split("::", 1)[0] for p in new_work_prefixes()})


def matches(nodeid: str, prefix: str) -> bool:
    """nodeid is the test `prefix` names: the file itself, the test, or one of its parameter sets."""
    return nodeid == prefix or nodeid.startswith(prefix + "::") or nodeid.startswith(prefix + "[")


def runs_on_cuda(item) -> bool:
    spec = getattr(item, "callspec", None)
    return "gpu" in item.keywords or (spec is not None and spec.params.get("device") == "cuda")


def is_new_work(item) -> bool:
    return any(matches(item.nodeid, p) for p in new_work_prefixes())


def pytest_addoption(parser):
    parser.addoption("--cuda-tests", choices=CHOICES, default=None,
                     help="gpu_check: keep only the CUDA tests of the new work (new), the others (rest), or all")


def pytest_collection_modifyitems(config, items):
    which = config.getoption("--cuda-tests")
    if which is None:
        return
    keep, drop = [], []
    for item in items:
        chosen = runs_on_cuda(item) and (which == "all" or is_new_work(item) == (which == "new"))
        (keep if chosen else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def _cuda_test_names(path: Path) -> set:
    """Test functions in a test file that run on CUDA by their decorators: @pytest.mark.gpu, or a
    `device` parameter over DEVICES (a static read, so a check needs no collection)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            marks = [ast.unparse(d) for d in node.decorator_list]
            if any(m == "pytest.mark.gpu" or (m.startswith("pytest.mark.parametrize(") and "DEVICES" in m)
                   for m in marks):
                names.add(node.name)
    return names


def check_new_work(root) -> list:
    """Problems with NEW_WORK against the test files under root: a file that is gone or has no CUDA
    test, a test that is gone or does not run on CUDA (it would silently drop out of the first stage)."""
    problems = []
    for prefix in new_work_prefixes():
        file, _, test = prefix.partition("::")
        path = Path(root) / file
        if not path.is_file():
            problems.append(f"{prefix}: no file {file}")
            continue
        names = _cuda_test_names(path)
        if test and test not in names:
            problems.append(f"{prefix}: no CUDA test {test} in {file}")
        elif not names:
            problems.append(f"{prefix}: {file} has no CUDA test")
    return problems


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--files"]:
        print(" ".join(new_work_files()))
        return 0
    if args == ["--check"]:
        problems = check_new_work(Path(__file__).resolve().parents[1])
        print("\n".join(problems) or "NEW_WORK: every entry names a CUDA test")
        return 1 if problems else 0
    if args:
        print("usage: gpu_check_tests.py [--files | --check]", file=sys.stderr)
        return 2
    for feature, prefixes in NEW_WORK.items():
        print(f"{feature}: {' '.join(prefixes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
