"""Sampling runs to files (ddpm_fast.sampling.runs, `ddpm-fast sample --out-dir`): image i depends only on
(seed, i), whatever the batch size, number of processes or interruptions; the folder is the state.

The shipped digits16 model with a few steps keeps each run to seconds. Runs in subprocesses pin
OMP_NUM_THREADS=1: on CPU oneDNN splits sums by thread count, so bits are equal only for equal counts
(the manifest records it), and torchrun sets 1 per process.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast
from ddpm_fast.sampling import runs
from ddpm_fast.io.checkpoint import load_checkpoint
from ddpm_fast.io.lock import LOCK_NAME, folder_lock
from ddpm_fast.cli import main
from helpers import install_stand_in_capture
from tolerances import tol

ROOT = Path(__file__).resolve().parents[1]
N = 20
FAST = dict(sampler="ddim", num_inference_steps=4)
DDPM = dict(sampler="ddpm", num_inference_steps=5)


@pytest.fixture(scope="module")
def digits():
    return load_checkpoint(ddpm_fast.default_checkpoint_path())


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".png"}


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MASTER_", "WORLD_", "RANK"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return env


def _cli(*args, timeout=300):
    cmd = [sys.executable, "-m", "ddpm_fast", "sample", "--device", "cpu", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _run(model_cfg, out, batch, **kw):
    model, cfg = model_cfg
    return runs.sample_to_folder(model, out, kw.pop("num_images", N), batch, config=cfg, device="cpu", progress=False,
                                 **kw)


# --- image i depends only on (seed, i) ---------------------------------------------------------------
@pytest.mark.parametrize("noise", ["philox", "generator"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("sampler", [FAST, DDPM], ids=["ddim", "ddpm"])
def test_batch_size_does_not_change_a_file(digits, tmp_path, backend, sampler, noise):
    a = _run(digits, tmp_path / "b7", 7, backend=backend, noise=noise, **sampler)
    b = _run(digits, tmp_path / "b16", 16, backend=backend, noise=noise, **sampler)
    assert a.written == b.written == N
    fa, fb = _files(tmp_path / "b7"), _files(tmp_path / "b16")
    assert list(fa) == [f"{i:06d}.png" for i in range(N)]
    assert fa == fb
    # ... and the images are not all alike (a constant image would pass the equality too)
    assert len(set(fa.values())) == N


def test_a_fixed_model_batch_makes_the_bits_independent_of_the_batch(digits):
    # Why model_batch exists: oneDNN picks its conv algorithm by shape, so on some CPUs (the AMD EPYC dev VM,
    # AVX2) the same images computed in batches of 7 and 16 differ in their float bits; on others (an
    # AVX-512 Xeon) they happen not to. With a fixed model_batch they are equal everywhere.
    model, cfg = digits
    kw = dict(config=cfg, output_type="pt", progress=False, noise="philox", seed=0, **DDPM)
    assert torch.equal(ddpm_fast.sample(model, batch_size=7, model_batch=16, **kw),
                       ddpm_fast.sample(model, batch_size=16, model_batch=16, **kw)[:7])


def test_folder_images_are_sample_images(digits, tmp_path):
    # The folder holds what sample() draws for the same Philox key in one batch.
    model, cfg = digits
    _run(digits, tmp_path / "r", 6, backend="fast", seed=5, **FAST)
    want = ddpm_fast.sample(model, batch_size=N, config=cfg, output_type="np", progress=False, backend="fast",
                            noise="philox", seed=5, model_batch=16, **FAST)
    got = np.stack(list(runs.read_images(tmp_path / "r", N))).astype(np.float32) / 255.0
    np.testing.assert_array_equal(got, (np.clip(want, 0, 1) * 255).round() / 255.0)


def test_philox_noise_gives_the_same_images_on_both_backends(digits):
    model, cfg = digits
    kw = dict(batch_size=8, config=cfg, output_type="pt", progress=False, noise="philox", seed=123, sampler="ddpm",
              num_inference_steps=10)
    ref = ddpm_fast.sample(model, backend="reference", **kw)
    fast = ddpm_fast.sample(model, backend="fast", **kw)
    torch.testing.assert_close(fast, ref, **tol("sampling_philox_backends", torch.float32))
    # the generator default of the reference backend draws other noise: the comparison can fail
    other = ddpm_fast.sample(model, backend="reference", **{**kw, "noise": "generator", "seed": None})
    assert (other - ref).abs().max() > 0.1


# --- resumable ----------------------------------------------------------------------------------------
def test_sigkill_then_resume_gives_the_uninterrupted_images(tmp_path):
    n, args = 90, ["--num-images", "90", "--batch-size", "3", "--sampler", "ddim", "--steps", "4"]
    assert _cli(*args, "--out-dir", str(tmp_path / "whole")).returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpm_fast", "sample", "--device", "cpu", "--no-progress", *args,
           "--out-dir", str(out)]
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = len(list(out.glob("*.png"))) if out.exists() else 0
        # wait until this run writes, then kill at a random moment of its sampling
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and len(list(out.glob("*.png"))) == before:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))  # short: a run of the shipped model writes ~100 images/s here
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for p in out.glob("*.png"):  # every file present is a complete image
            with Image.open(p) as im:
                im.load()
    assert kills >= 2, "the runs finished before they could be killed: the test did not test"
    assert len(list(out.glob("*.png"))) < n
    res = _cli(*args, "--out-dir", str(out))
    assert res.returncode == 0, res.stderr
    assert _files(out) == _files(tmp_path / "whole") and len(_files(out)) == n
    assert sorted(p.name for p in out.iterdir()) == sorted(_files(out)) + [runs.MANIFEST]  # no temp files left


def test_a_second_run_into_a_busy_folder_is_refused_and_resume_after_kill_works(tmp_path):
    # Two processes: the second fails at once naming the folder and the first's pid; a kill -9 of the
    # first frees the folder (the OS drops the lock) and a rerun resumes.
    out = tmp_path / "r"
    args = ["--num-images", "400", "--batch-size", "4", "--sampler", "ddim", "--steps", "4", "--out-dir", str(out)]
    cmd = [sys.executable, "-m", "ddpm_fast", "sample", "--device", "cpu", "--no-progress", *args]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline and not list(out.glob("*.png")):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the test could overlap it"
        t0 = time.monotonic()
        second = _cli(*args, timeout=120)
        assert second.returncode == 2 and time.monotonic() - t0 < 60
        assert f"another run is writing to {out} (pid {first.pid} on " in second.stderr, second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    kept = len(_files(out))
    assert 0 < kept < 400 and (out / LOCK_NAME).exists()  # the lock file outlives a kill -9 ...
    res = _cli(*args)
    assert res.returncode == 0, res.stderr  # ... but not its lock
    assert f"({kept} already there" in res.stdout and len(_files(out)) == 400
    assert not (out / LOCK_NAME).exists()


def test_a_second_run_in_the_same_process_is_refused(digits, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    with folder_lock(out):
        with pytest.raises(ValueError, match=f"another run is writing to {out} \\(pid {os.getpid()} on "):
            _run(digits, out, 4, num_images=4, **FAST)
        assert not _files(out)
    res = _run(digits, out, 4, num_images=4, **FAST)  # released
    assert res.written == 4 and sorted(p.name for p in out.iterdir()) == sorted(_files(out)) + [runs.MANIFEST]


def test_changed_settings_are_refused_and_more_images_extend(digits, tmp_path):
    out = tmp_path / "r"
    _run(digits, out, 8, num_images=10, seed=1, **FAST)
    manifest = json.loads((out / runs.MANIFEST).read_text())
    assert manifest["settings"]["seed"] == 1 and manifest["settings"]["noise"] == "philox"
    with pytest.raises(ValueError, match="seed: folder has 1, this run 2"):
        _run(digits, out, 8, num_images=10, seed=2, **FAST)
    with pytest.raises(ValueError, match="steps"):
        _run(digits, out, 8, num_images=10, seed=1, sampler="ddim", num_inference_steps=3)
    with pytest.raises(ValueError, match="beyond --num-images 5"):
        _run(digits, out, 8, num_images=5, seed=1, **FAST)
    before = _files(out)
    res = _run(digits, out, 8, num_images=14, seed=1, **FAST)
    assert res.skipped == 10 and res.written == 4
    after = _files(out)
    assert {k: after[k] for k in before} == before and len(after) == 14
    fresh = _run(digits, tmp_path / "fresh", 8, num_images=14, seed=1, **FAST)
    assert fresh.written == 14 and _files(tmp_path / "fresh") == after


@pytest.mark.parametrize("noise", ["philox", "generator"])
def test_a_run_captures_one_graph_for_all_its_batches(digits, tmp_path, monkeypatch, noise):
    # On CUDA the fast backend keeps its captured graph between calls, keyed by shapes among others: a
    # run's batches (6, 6, 6 and a last one of 2, padded to 6) must all hit one entry. On CPU through
    # the stand-in capture of helpers (graph replay = the step re-run on the captured state), with
    # fast_loop forced onto its graph path; the files must be those of the eager run.
    import ddpm_fast.sampling.fast_loop as fs
    import ddpm_fast.sampling.graphs as graphs

    _run(digits, tmp_path / "eager", 6, backend="fast", noise=noise, **FAST)
    graphs.clear_graph_cache()
    captured = install_stand_in_capture(monkeypatch)
    loop = fs.fast_loop
    monkeypatch.setattr(fs, "fast_loop", lambda *a, **k: loop(*a, cuda_graph=True, **k))
    try:
        res = _run(digits, tmp_path / "graph", 6, backend="fast", noise=noise, **FAST)
        assert res.written == N and len(captured) == 1, f"{len(captured)} captures for one run"
        assert len(graphs.GRAPHS) == 1
    finally:
        graphs.clear_graph_cache()
    assert _files(tmp_path / "graph") == _files(tmp_path / "eager")


def test_npz_is_the_adm_layout(digits, tmp_path):
    res = _run(digits, tmp_path / "r", 6, npz=tmp_path / "all.npz", **FAST)
    with np.load(res.npz) as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 16, 16, 1)
    np.testing.assert_array_equal(arr, np.stack(list(runs.read_images(tmp_path / "r", N))))
    assert not list(tmp_path.glob(".*.tmp"))


# --- torchrun ---------------------------------------------------------------------------------------------
def _torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddpm_fast", "sample", "--device", "cpu", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.mark.parametrize("backend,sampler", [("fast", ["--sampler", "ddim", "--steps", "4"]),
                                             ("reference", ["--sampler", "ddpm", "--steps", "5"])],
                         ids=["fast-ddim", "reference-ddpm"])
def test_torchrun_two_processes_write_the_single_process_images(tmp_path, backend, sampler):
    common = ["--num-images", "17", "--backend", backend, *sampler]
    one = _cli(*common, "--batch-size", "7", "--out-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = _torchrun(2, *common, "--batch-size", "5", "--out-dir", str(tmp_path / "two"), "--npz",
                    str(tmp_path / "two.npz"))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert _files(tmp_path / "two") == _files(tmp_path / "one") and len(_files(tmp_path / "one")) == 17
    with np.load(tmp_path / "two.npz") as f:
        assert f["arr_0"].shape == (17, 16, 16, 1)


def test_torchrun_refusals_end_every_rank(tmp_path):
    res = _torchrun(2, "--num-images", "1", "--out-dir", str(tmp_path / "r"), timeout=200)
    assert res.returncode != 0 and "2 processes for 1 images" in res.stderr
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    res = _torchrun(2, "--num-images", "4", "--out-dir", str(tmp_path / "f"), timeout=200)
    assert res.returncode != 0 and "files this run did not write (notes.txt)" in res.stderr


@pytest.mark.parametrize("fail_rank", ["0", "1"])
def test_torchrun_a_rank_that_fails_ends_the_run_with_its_error(tmp_path, fail_rank):
    # tests/failing_rank_run.py: the model raises on rank fail_rank after that rank's first batch, while
    # the other rank still has ~50 batches to draw. torchrun's agent sees the failed worker and stops the
    # other: the run must end non-zero, with the failing rank's error, in bounded time (no hang).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "failing_rank_run.py"), str(tmp_path / "r")]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**_env(), "FAIL_RANK": fail_rank})
    assert res.returncode != 0 and time.monotonic() - t0 < 120
    assert f"RuntimeError: injected failure on rank {fail_rank}" in res.stderr, res.stderr[-3000:]
    pngs = list((tmp_path / "r").glob("*.png"))
    assert 0 < len(pngs) < 400
    for p in pngs:  # what the stopped rank left is complete images only
        with Image.open(p) as im:
            im.load()


# --- bad input: one line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,msg", [
    (["--num-images", "0"], "--num-images"), (["--num-images", "1000001"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "65537"], "--batch-size"),
    (["--npz", "x.npz"], "--npz applies to runs into a folder"),
    (["--batch-size", "4"], "--batch-size applies to runs into a folder"),
    (["--noise", "philox"], "--noise applies"), (["--num-images", "70000"], "use --out-dir"),
    (["--out-dir", "D", "--out", "g.png"], "exclude each other"), (["--out-dir", "D", "--npz", "x.zip"], "end in .npz"),
    (["--out-dir", ""], "must not be empty")])
def test_cli_rejects_bad_run_arguments(flags, msg, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error:") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "D").exists()


def test_bad_folders_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "cat.jpg").write_bytes(b"x")
    (tmp_path / "orphans").mkdir()
    (tmp_path / "orphans" / "000000.png").write_bytes(b"x")
    cases = [(tmp_path / "file", "is not a directory"), (tmp_path / "foreign", "did not write (cat.jpg)"),
             (tmp_path / "orphans", "no manifest.json"), (Path("/proc/self/ddpm_runs"), "cannot create --out-dir")]
    for out, msg in cases:
        assert main(["sample", "--device", "cpu", "--num-images", "2", "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ddpm-fast: error:") and msg in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["cat.jpg"]


def test_api_rejects_bad_arguments(digits, tmp_path):
    for kw, msg in [(dict(num_images=0), "num_images"), (dict(num_images=10 ** 6 + 1), "num_images"),
                    (dict(noise="bogus"), "noise"), (dict(seed=-1), "seed"), (dict(model_batch=0), "model_batch"),
                    (dict(npz=tmp_path / "x.zip"), "npz"), (dict(npz=tmp_path / "no" / "x.npz"), "does not exist")]:
        with pytest.raises(ValueError, match=msg):
            _run(digits, tmp_path / "r", 4, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        _run(digits, tmp_path / "r", 0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        _run(digits, tmp_path / "r", 4, bogus=1)
    assert not (tmp_path / "r").exists()
