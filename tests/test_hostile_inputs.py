"""The defects a hostile review found (~230 bad inputs): each gets a clear error or a documented
behaviour. Written against the public surface (ddpm_fast.*, the CLI) so each test also runs, and
fails, on the code from before its fix."""
import os
import re
import stat

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast import UNet, cli, get_preset, make_grid, save_checkpoint

TINY = get_preset("tiny")


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ddpm-fast: error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles), err


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    return path


# --- destinations that are not regular files ---------------------------------------------------------
def test_save_checkpoint_onto_a_device_node_is_refused(tmp_path):
    # A node of its own (the same device numbers as /dev/full), so that a regression destroys nothing real.
    node = tmp_path / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here ({e})")
    before = os.stat(node)
    with pytest.raises(ValueError, match="full.*character device"):
        save_checkpoint(node, UNet(TINY.unet), TINY)
    after = os.stat(node)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev  # still the device node


def test_save_checkpoint_onto_a_fifo_or_a_symlink_to_one_is_refused(tmp_path, fifo):
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    for dest, what in ((fifo, "a FIFO"), (link, "a FIFO (through a symlink)")):
        with pytest.raises(ValueError, match=re.escape(dest.name) + ".*" + re.escape(what)):
            save_checkpoint(dest, UNet(TINY.unet), TINY)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()


def test_sample_cli_onto_a_fifo_is_one_line_before_sampling(tmp_path, capsys):
    out = tmp_path / "grid.png"
    os.mkfifo(out)
    code = cli.main(["sample", "--preset", "tiny", "--steps", "1", "--num-images", "1", "--no-progress",
                     "--device", "cpu", "--out", str(out)])
    _one_line_error(capsys, code, "grid.png", "FIFO")
    assert stat.S_ISFIFO(os.stat(out).st_mode)


# --- JSON nested deep in a file's metadata -------------------------------------------------------------
def _deep_metadata_file(path, key, payload):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "ddpm_fast/1", key: payload})


def test_a_deeply_nested_config_is_one_line_for_sample(tmp_path, capsys):
    path = tmp_path / "deep.safetensors"
    _deep_metadata_file(path, "ddpm_fast_config", "[" * 50_000 + "]" * 50_000)
    with pytest.raises(ValueError, match="nested"):
        ddpm_fast.load_checkpoint(path)
    code = cli.main(["sample", "--checkpoint", str(path), "--no-progress", "--out", str(tmp_path / "g.png")])
    _one_line_error(capsys, code, "nested")


def test_a_deeply_nested_train_state_is_one_line_for_resume(tmp_path, capsys):
    from safetensors.torch import save_file

    run = tmp_path / "run"
    run.mkdir()
    save_file({"x": torch.zeros(1)}, str(run / "checkpoint.safetensors"),
              metadata={"format": "ddpm_fast/train-1", "ddpm_fast_config": TINY.to_json(),
                        "train_state": "{\"a\": " * 50_000 + "1" + "}" * 50_000})
    code = cli.main(["train", "--data", "digits", "--preset", "tiny", "--out", str(run), "--resume", "--steps", "2",
                     "--no-progress", "--sample-every", "0"])
    _one_line_error(capsys, code, "nested")


# --- silently accepted nonsense ---------------------------------------------------------------------------
def test_cpu_with_an_index_is_refused(tmp_path, capsys):
    code = cli.main(["sample", "--preset", "tiny", "--steps", "1", "--num-images", "1", "--no-progress",
                     "--device", "cpu:7", "--out", str(tmp_path / "g.png")])
    _one_line_error(capsys, code, "cpu:7")
    assert os.listdir(tmp_path) == []
    assert ddpm_fast.devices.parse_device("cpu:0").type == "cpu"  # the one CPU device, by its full name


def test_an_ico_output_is_refused_not_shrunk(tmp_path, capsys):
    code = cli.main(["sample", "--preset", "tiny", "--steps", "1", "--num-images", "1", "--no-progress",
                     "--device", "cpu", "--out", str(tmp_path / "g.ico")])
    _one_line_error(capsys, code, "ICO")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_make_grid_refuses_non_finite_images(bad):
    images = torch.rand(2, 3, 4, 4)
    images[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_grid(images)
    with pytest.raises(ValueError, match="NaN or Inf"):
        make_grid(images.permute(0, 2, 3, 1).numpy())
    assert make_grid(np.zeros((1, 4, 4, 3), np.float32)).size == (8, 8)  # finite input still works


def test_save_checkpoint_refuses_nan_weights(tmp_path):
    model = UNet(TINY.unet)
    with torch.no_grad():
        model.final.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf.*final.weight"):
        save_checkpoint(tmp_path / "m.safetensors", model, TINY)
    assert os.listdir(tmp_path) == []


def _train(out, *extra):
    return cli.main(["train", "--data", "digits", "--preset", "tiny", "--image-size", "8", "--out", str(out),
                     "--batch-size", "4", "--sample-every", "0", "--checkpoint-every", "2", "--no-progress", *extra])


def test_resume_past_the_requested_steps_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    capsys.readouterr()
    _one_line_error(capsys, _train(out, "--steps", "1", "--resume"), "step 2", "--steps")
    assert _train(out, "--steps", "2", "--resume") == 0  # a finished run resumed: says so, changes nothing
    assert "already at step 2" in capsys.readouterr().err


def test_resume_with_a_huge_step_is_an_error(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    out = tmp_path / "run"
    assert _train(out, "--steps", "2") == 0
    ckpt = out / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    meta["train_state"] = meta["train_state"].replace('"step": 2', '"step": 1000000000000')
    save_file(load_file(str(ckpt)), str(ckpt), metadata=meta)
    capsys.readouterr()
    _one_line_error(capsys, _train(out, "--steps", "3", "--resume"), "1000000000000")


def test_a_fresh_run_into_a_folder_of_unrelated_files_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _one_line_error(capsys, _train(out, "--steps", "1"), "notes.txt")
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_out_set_to_the_data_folder_is_named_as_such(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(data / f"{i}.png")
    code = cli.main(["train", "--data", str(data), "--out", str(data), "--preset", "tiny", "--steps", "1",
                     "--no-progress"])
    _one_line_error(capsys, code, "run folder")
    assert sorted(os.listdir(data)) == [f"{i}.png" for i in range(4)]


def test_bench_report_shows_huge_times_in_a_few_digits(tmp_path, capsys):
    import json

    def bench(provider, median):
        return {"name": f"test_op[{provider}]", "group": "op", "stats": {"median": median, "mean": median,
                "min": median, "max": median, "stddev": 0.0, "rounds": 1}, "extra_info": {"provider": provider}}

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"machine_info": {}, "commit_info": {},
                                "benchmarks": [bench("reference", 1e300), bench("fast", 1e299)]}))
    assert cli.main(["bench-report", str(path), "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "1e+300 s" in text and max(len(w) for w in text.split()) < 60


# --- native bf16 on CPU: detected from the flags the CPU reports, never assumed ---------------------------
@pytest.mark.parametrize("flags,want", [
    ("fpu avx2 fma avx512f avx512_bf16 avx512_vnni", ("avx512_bf16",)),
    ("fpu avx2 amx_bf16 amx_tile avx512_bf16", ("avx512_bf16", "amx_bf16")),
    ("fpu avx2 fma avx512f avx512bw", ()),          # AVX-512 without its bf16 extension
    ("fpu avx2 fma", ())])
def test_cpu_bf16_is_detected_from_the_cpu_flags(tmp_path, flags, want):
    from ddpm_fast.devices import cpu_bf16_flags, cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_bf16_flags(str(info)) == want
    assert cpu_has_native_bf16(str(info)) is bool(want)


def test_cpu_bf16_without_cpuinfo_is_not_native(tmp_path):
    from ddpm_fast.devices import cpu_bf16_flags, cpu_has_native_bf16

    assert cpu_bf16_flags(str(tmp_path / "missing")) == () and not cpu_has_native_bf16(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("")
    assert not cpu_has_native_bf16(str(tmp_path / "empty"))
