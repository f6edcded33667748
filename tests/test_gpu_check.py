"""scripts/gpu_check.sh's plan and deadline plumbing, on the CPU, in a few seconds.

The GPU run is one short device call, so what it cannot afford is a plan that does not add up, a stage
that overruns the deadline, a stage that silently drops its tests, or an archive that is not written.
These tests run the script with every stage replaced by a sleep or a failure (GPU_CHECK_STUB) and check
the plan's copies, the selection of the new work's CUDA tests, and the profile's kernel kinds.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

needs_shell = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout") and shutil.which("tar")),
                                 reason="needs bash, coreutils timeout and tar")


def _module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(env, *args, timeout=60):
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()), **env}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _summary(results: Path) -> dict:
    """stage -> (status, the rest of its line) from summary.txt."""
    rows = {}
    for line in (results / "summary.txt").read_text().splitlines()[2:]:
        name, status, *rest = line.split(None, 2)
        rows[name] = (status, rest[0] if rest else "")
    return rows


@needs_shell
def test_plan_adds_up_and_its_copies_agree():
    plan = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in plan.splitlines()[2:]]
    budgets = {r[0].strip(): int(r[1]) for r in rows}
    assert sum(budgets.values()) == 480, budgets
    assert list(budgets)[:2] == ["env", "build"] and list(budgets)[-1] == "pack"
    header = "\n".join(line[2:] for line in SCRIPT.read_text().splitlines() if line.startswith("# |"))
    assert header == plan.strip(), "the table in gpu_check.sh's header differs from its BUDGET/WHAT arrays"
    assert plan.strip() in (ROOT / "benchmarks" / "PERF_NOTES.md").read_text(), \
        "benchmarks/PERF_NOTES.md must carry the plan table exactly as `gpu_check.sh --plan` prints it"


def test_the_script_installs_nothing():
    # The GPU machine has no network: a pip install would hang on it or replace its torch.
    code = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"pip\S*\s+install", line)]


@needs_shell
def test_a_stage_over_its_budget_is_cut_and_the_rest_still_run_and_pack(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    proc, took = _run({"OUT": str(out), "RESULTS_DIR": str(results), "GPU_CHECK_DEADLINE_S": "12",
                       "GPU_CHECK_MIN_STAGE_S": "0.2", "GPU_CHECK_STUB": "tests-new=60 profile=fail"})
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a cut tests-new and a failed stage fail the run
    assert took < 12, f"the script overran its 12 s deadline: {took:.1f} s"
    rows = _summary(results)
    assert list(rows) == ["env", "build", "tests-new", "tests-cuda", "bench-sampling", "profile", "bench-ops"]
    assert rows["tests-new"][0] == "cut" and "stopped at its limit" in rows["tests-new"][1]
    # tests-new may use build's unused budget, never a later stage's: at most 12 s less the pack's and the
    # later stages' budgets (8 + 40 + 225 + 40 + 32 of 480 s, scaled to 12 s: 3.375 s), less the time gone.
    used, limit = map(float, re.findall(r"([\d.]+) s", rows["tests-new"][1])[:2])
    assert 2.0 < limit <= 3.4 and 0.85 * limit <= used <= limit + 0.3, rows["tests-new"]
    assert rows["profile"][0] == "failed"
    assert all(rows[s][0] == "ok" for s in ("env", "build", "tests-cuda", "bench-sampling", "bench-ops"))
    with tarfile.open(out / "gpu_check_results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"results/summary.txt", "results/env.txt", "results/gpu_check.log"} <= names, names
    assert (out / "summary.txt").read_text() == (results / "summary.txt").read_text()


@needs_shell
def test_too_little_time_skips_stages_with_a_reason(tmp_path):
    results = tmp_path / "results"
    proc, took = _run({"RESULTS_DIR": str(results), "GPU_CHECK_DEADLINE_S": "2", "GPU_CHECK_STUB": "1"})
    assert proc.returncode == 1 and took < 2
    rows = _summary(results)
    assert rows["build"][0] == "skipped" and "minimum 3.0 s" in rows["build"][1]
    assert all(rows[s] == ("skipped", "the build did not finish") for s in list(rows)[2:])


@needs_shell
def test_unknown_stage_is_refused():
    proc, _ = _run({}, "bench-everything")
    assert proc.returncode == 2 and "usage:" in proc.stderr and "bench-sampling" in proc.stderr


def test_new_work_entries_name_cuda_tests():
    sel = _module("gpu_check_tests")
    assert sel.check_new_work(ROOT) == []
    # The check can fail: an entry naming a CPU-only test, or a gone one, is reported.
    sel.NEW_WORK["probe"] = ["tests/test_dispatch.py::test_fused_swaps_namespace_only", "tests/test_gone.py"]
    assert [p.split(":")[0] for p in sel.check_new_work(ROOT)] == ["tests/test_dispatch.py", "tests/test_gone.py"]


def test_selection_keeps_cuda_tests_and_splits_new_from_rest():
    sel = _module("gpu_check_tests")

    def item(nodeid, gpu=False, device=None):
        return SimpleNamespace(nodeid=nodeid, keywords={"gpu": 1} if gpu else {},
                               callspec=SimpleNamespace(params={"device": device}) if device else None)

    items = [item("tests/test_conv2d.py::test_gpu_opcheck[fp32]", gpu=True),
             item("tests/test_conv2d.py::test_matches_reference[cuda-fp32]", device="cuda"),
             item("tests/test_conv2d.py::test_matches_reference[cpu-fp32]", device="cpu"),
             item("tests/test_attention.py::test_gpu_opcheck[fp32]", gpu=True),
             item("tests/test_reverse_step.py::test_cuda_graph_replay_reads_the_device_seed", gpu=True),
             item("tests/test_reverse_step.py::test_cuda_graph_replay_reads_the_device_seed_x", gpu=True)]

    def chosen(which):
        kept, deselected = list(items), []
        config = SimpleNamespace(getoption=lambda _: which,
                                 hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
        sel.pytest_collection_modifyitems(config, kept)
        assert len(kept) + len(deselected) == len(items)
        return [i.nodeid.split("/")[1] for i in kept]

    assert chosen("new") == ["test_conv2d.py::test_gpu_opcheck[fp32]", "test_conv2d.py::test_matches_reference[cuda-fp32]",
                             "test_reverse_step.py::test_cuda_graph_replay_reads_the_device_seed"]
    assert chosen("rest") == ["test_attention.py::test_gpu_opcheck[fp32]",
                              "test_reverse_step.py::test_cuda_graph_replay_reads_the_device_seed_x"]
    assert len(chosen("all")) == 5


def test_profile_kinds_count_time_and_kernels():
    prof = _module("profile_unet")
    table = {  # names as the H100 profile printed them (benchmarks/results/gpu-2026-11-26/profile_unet.txt)
        "sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw_tilesize32x32x8": [4128.4, 61],
        "_conv_gemm_kernel": [300.0, 20], "_split_sum_kernel": [40.0, 20],
        "_gn_fused_kernel": [103.9, 41], "_flash_attn_fwd_kernel": [247.5, 6], "_time_embedding_kernel": [94.8, 1],
        "void at::native::elementwise_kernel<128, 2, CUDAFunctor_add<float>>": [120.4, 65],
        "void cudnn::engines_precompiled::nchwToNhwcKernel<float>": [10.0, 2],
        "std::enable_if<!(false), void>::type internal::gemvx::kernel<int, int, float>": [72.1, 22],
        "something_new": [1.0, 1]}
    kinds = prof.by_kind(table)
    assert kinds["conv"] == pytest.approx([4468.4, 101])
    assert {k: v[1] for k, v in kinds.items() if k != "conv"} == {
        "norm": 41, "attention": 6, "time": 1, "elementwise": 65, "layout": 2, "gemm": 22, "other": 1}
    rec = prof.summarize(5000.0, table)
    assert rec["kernels"] == 239 and list(rec["by_kind"])[0] == "conv"
