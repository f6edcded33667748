"""The `ddpm-fast` command, in-process through main() and once through `python -m ddpm_fast`."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import ddpm_fast.cli as cli
from ddpm_fast import UNet, get_preset, save_checkpoint

FAST = ["--preset", "tiny", "--steps", "2", "--num-images", "4", "--no-progress", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


def sample_cli(capsys, out, *extra):
    code = cli.main(["sample", *FAST, "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_writes_a_png_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, err = sample_cli(capsys, out, "--seed", "1")
    assert code == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (38, 38)  # 2 x 2 tiles of 16 + 2 px padding
    lines = stdout.strip().splitlines()
    assert lines[0] == str(out) and len(lines) == 2
    assert "4 images" in lines[1] and "2 steps" in lines[1] and "ddpm" in lines[1] and "cpu" in lines[1]
    assert lines[1].rstrip().endswith(" s")
    assert "randomly initialised" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["grid.png"]  # no temporary files left behind


def test_backend_default_is_fast_and_reference_is_selectable(tmp_path, capsys):
    # Same seed, same model: the backends draw their noise differently (Philox in the fused step vs
    # the CPU generator), so the grids differ; each run names its backend.
    fast, ref = tmp_path / "f.png", tmp_path / "r.png"
    code, out_fast, _ = sample_cli(capsys, fast, "--seed", "5")
    assert code == 0 and "fast backend" in out_fast
    code, out_ref, _ = sample_cli(capsys, ref, "--seed", "5", "--backend", "reference")
    assert code == 0 and "reference backend" in out_ref
    with Image.open(fast) as a, Image.open(ref) as b:
        assert a.size == b.size and a.tobytes() != b.tobytes()


def test_nrow_and_ddim(tmp_path, capsys):
    out = tmp_path / "row.png"
    code, _, _ = sample_cli(capsys, out, "--nrow", "4", "--sampler", "ddim", "--eta", "0.5", "--clip-x0")
    assert code == 0
    with Image.open(out) as im:
        assert im.size == (4 * 18 + 2, 20)


def test_same_seed_same_bytes_different_seed_different_images(tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert sample_cli(capsys, a, "--seed", "3")[0] == 0
    assert sample_cli(capsys, b, "--seed", "3")[0] == 0
    assert sample_cli(capsys, c, "--seed", "4")[0] == 0
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as ia, Image.open(c) as ic:
        assert ia.tobytes() != ic.tobytes()


def test_checkpoint_argument(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = get_preset("digits16")
    path = save_checkpoint(tmp_path / "d.safetensors", UNet(cfg.unet), cfg)
    out = tmp_path / "d.png"
    code = cli.main(["sample", "--checkpoint", str(path), "--steps", "2", "--num-images", "3", "--no-progress",
                     "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "note" not in captured.err
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (38, 38)  # 3 images: 2 per row, 2 rows


def test_no_checkpoint_falls_back_to_random_tiny_with_a_notice(tmp_path, capsys, monkeypatch):
    import ddpm_fast.io.checkpoint as ck
    monkeypatch.setattr(ck, "default_checkpoint_path", lambda: None)
    out = tmp_path / "g.png"
    code = cli.main(["sample", "--steps", "2", "--num-images", "2", "--no-progress", "--device", "cpu",
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.exists()
    assert err.count("\n") == 1 and "noise until a model is trained" in err


def test_default_uses_the_shipped_model_when_present(tmp_path, capsys, monkeypatch):
    import ddpm_fast.io.checkpoint as ck
    torch.manual_seed(0)
    cfg = get_preset("digits16")
    shipped = save_checkpoint(tmp_path / "digits16.safetensors", UNet(cfg.unet), cfg)
    monkeypatch.setattr(ck, "default_checkpoint_path", lambda: shipped)
    out = tmp_path / "g.png"
    code = cli.main(["sample", "--steps", "2", "--num-images", "2", "--no-progress", "--device", "cpu",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "note" not in captured.err and str(shipped) in captured.out
    with Image.open(out) as im:
        assert im.mode == "L"


@pytest.mark.parametrize("args,match", [
    (["--num-images", "0"], "--num-images"), (["--num-images", "-3"], "--num-images"),
    (["--num-images", "two"], "--num-images"), (["--steps", "0"], "--steps"), (["--steps", "5000"], "exceeds"),
    (["--sampler", "pndm"], "--sampler"), (["--eta", "1.5"], "--eta"), (["--eta", "0.3"], "ddim only"),
    (["--variant", "x"], "--variant"), (["--dtype", "fp64"], "--dtype"), (["--backend", "cuda"], "--backend"),
    (["--nrow", "0"], "--nrow"), (["--seed", "-1"], "--seed"), (["--preset", "huge"], "--preset"),
    (["--device", "tpu9"], "not a device name"), (["--bogus"], "unrecognized arguments"),
    (["--backend", "reference", "--channels-last"], "--channels-last"),
    (["--device", "meta"], "--device 'meta' is not supported"), (["--device", "mps"], "not supported"),
    (["--device", ""], "--device must not be empty"), (["--device", "cuda:64"], "--device 'cuda:64'"),
    (["--sampler", "ddim", "--variant", "paper"], "--variant applies to --sampler ddpm only"),
    (["--num-images", "100000000"], "must be in [1, 1000000]"),
])
def test_bad_arguments(tmp_path, capsys, args, match):
    out = tmp_path / "g.png"
    code, stdout, err = sample_cli(capsys, out, *args)
    assert code != 0 and stdout == ""
    assert err.startswith("ddpm-fast: error: ") and err.endswith("\n") and err.count("\n") == 1
    assert match in err
    assert os.listdir(tmp_path) == []


def test_empty_checkpoint_is_an_error_not_the_default_model(tmp_path, capsys, monkeypatch):
    # An empty --checkpoint (an unset shell variable) used to sample the shipped model silently.
    import ddpm_fast.io.checkpoint as ck
    cfg = get_preset("tiny")
    shipped = save_checkpoint(tmp_path / "shipped.safetensors", UNet(cfg.unet), cfg)
    monkeypatch.setattr(ck, "default_checkpoint_path", lambda: shipped)
    out = tmp_path / "g.png"
    code = cli.main(["sample", "--checkpoint", "", "--steps", "2", "--num-images", "1", "--no-progress",
                     "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert code != 0 and captured.out == "" and not out.exists()
    assert captured.err == "ddpm-fast: error: --checkpoint must not be empty (give a .safetensors path, or leave it " \
                           "out for the default model)\n"


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 2147483648 bytes.\nError code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
], ids=["cpu-allocator", "cuda", "python"])
def test_out_of_memory_is_a_one_line_error(tmp_path, capsys, monkeypatch, error):
    import ddpm_fast.sampling as sampling

    def too_big(*a, **k):
        raise error

    monkeypatch.setattr(sampling, "sample", too_big)
    code, stdout, err = sample_cli(capsys, tmp_path / "g.png")
    assert code == 2 and stdout == "" and os.listdir(tmp_path) == []
    assert err.startswith("ddpm-fast: error: out of memory") and err.count("\n") == 1


def test_other_runtime_errors_are_bugs_with_a_traceback(tmp_path, capsys, monkeypatch):
    import ddpm_fast.sampling as sampling

    def bug(*a, **k):
        raise RuntimeError("shape mismatch in some kernel")

    monkeypatch.setattr(sampling, "sample", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        sample_cli(capsys, tmp_path / "g.png")


@pytest.mark.parametrize("name,preset", [("g.h5", "tiny"), ("g.xbm", "tiny"), ("g.wmf", "tiny"),
                                         ("g.qoi", "digits16")])
def test_unwritable_format_fails_before_sampling(tmp_path, capsys, monkeypatch, name, preset):
    # PIL knows these extensions but cannot write the grid's mode (RGB for tiny, L for the 1-channel
    # digits16) in them: refused before a sampling run, as one line (no note before it).
    import ddpm_fast.sampling as sampling

    def must_not_run(*a, **k):
        raise AssertionError("sampled before refusing the output format")

    monkeypatch.setattr(sampling, "sample", must_not_run)
    code = cli.main(["sample", "--preset", preset, "--steps", "2", "--num-images", "1", "--no-progress",
                     "--device", "cpu", "--out", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("ddpm-fast: error: cannot write") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_a_four_channel_model_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import dataclasses

    import ddpm_fast.sampling as sampling

    cfg = get_preset("tiny")
    cfg = type(cfg)(dataclasses.replace(cfg.unet, image_channels=4), cfg.diffusion)
    path = save_checkpoint(tmp_path / "rgba.safetensors", UNet(cfg.unet), cfg)
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    code = cli.main(["sample", "--checkpoint", str(path), "--no-progress", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code != 0 and "4-channel images" in err and err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


def test_note_only_after_a_successful_save(tmp_path, capsys, monkeypatch):
    import ddpm_fast.io.images as images

    def disk_full(image, path):
        raise OSError(f"cannot write {path}: disk full")

    monkeypatch.setattr(images, "save_image_atomic", disk_full)
    code, stdout, err = sample_cli(capsys, tmp_path / "g.png")
    assert code != 0 and stdout == ""
    assert err.startswith("ddpm-fast: error: ") and "disk full" in err and err.count("\n") == 1


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "both-sources"])
def test_bad_checkpoints(tmp_path, capsys, case):
    path = tmp_path / "m.safetensors"
    if case in ("corrupt", "truncated"):
        cfg = get_preset("tiny")
        save_checkpoint(path, UNet(cfg.unet), cfg)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if case == "truncated" else b"\xff" * 64 + data[64:])
    extra = ["--preset", "tiny"] if case == "both-sources" else []
    out = tmp_path / "g.png"
    code = cli.main(["sample", "--checkpoint", str(path), *extra, "--steps", "2", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("ddpm-fast: error: ") and err.count("\n") == 1
    assert not out.exists()
    if case != "both-sources":
        assert str(path) in err


@pytest.mark.parametrize("out,match", [("missing/g.png", "does not exist"), ("file.txt/g.png", "not a directory"),
                                       ("g.xyz", "unknown image extension"), ("g", "unknown image extension")])
def test_bad_output_paths(tmp_path, capsys, out, match):
    (tmp_path / "file.txt").write_text("x")
    code, stdout, err = sample_cli(capsys, tmp_path / out)
    assert code != 0 and err.startswith("ddpm-fast: error: ") and err.count("\n") == 1 and match in err
    assert os.listdir(tmp_path) == ["file.txt"]


def test_interrupt_writes_nothing(tmp_path, capsys, monkeypatch):
    import ddpm_fast.sampling as sampling

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample", interrupted)
    code, _, err = sample_cli(capsys, tmp_path / "g.png")
    assert code == 130 and "interrupted" in err
    assert os.listdir(tmp_path) == []


def test_help_lists_available_commands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("sample", "train", "bench-report"))
    assert cli.main(["sample", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_no_command_is_a_one_line_error(capsys):
    assert cli.main([]) != 0
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error: ") and err.count("\n") == 1


def test_python_dash_m(tmp_path):
    out = tmp_path / "grid.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", *FAST, "--out", str(out), "--seed", "9"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == str(out)
    with Image.open(out) as im:
        assert im.size == (38, 38)
    bad = subprocess.run([sys.executable, "-m", "ddpm_fast", "sample", *FAST, "--steps", "0", "--out",
                          str(tmp_path / "x.png")], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("ddpm-fast: error: ") and bad.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]


@pytest.mark.parametrize("native, backend, device, want", [
    (True, "fast", "cpu", ("bf16", True)), (False, "fast", "cpu", ("fp32", True)),
    (True, "reference", "cpu", ("fp32", False)), (True, "fast", "cuda", ("fp32", False))])
def test_auto_dtype_picks_nhwc_for_the_fast_cpu_backend_and_bf16_where_native(monkeypatch, native, backend,
                                                                            device, want):
    import argparse

    import ddpm_fast.devices
    from ddpm_fast.cli import _auto_dtype

    monkeypatch.setattr(ddpm_fast.devices, "cpu_has_native_bf16", lambda: native)
    args = argparse.Namespace(dtype="auto", backend=backend, channels_last=False)
    assert _auto_dtype(args, torch.device(device)) == want
    # An explicit --dtype is kept as given.
    assert _auto_dtype(argparse.Namespace(dtype="fp16", backend=backend, channels_last=False),
                       torch.device(device)) == ("fp16", False)
