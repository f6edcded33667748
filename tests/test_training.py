"""Training: loss goes down, EMA math, exact checkpoint round trip, resume (in-process and after
SIGKILL), clear errors for bad checkpoints / data / arguments, and the built-in digits dataset."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast.config import DiffusionConfig, ModelConfig, UNetConfig
from ddpm_fast.training.data import DataError, ImageFolder, digits_dataset, load_dataset
from ddpm_fast.reference import Schedule, UNet
from ddpm_fast import cli
from ddpm_fast.cli import add_train_arguments, run_train_from_args
from ddpm_fast.training import (CheckpointError, ema_decay_at, ema_update, export_model, load_train_checkpoint,
                                read_train_checkpoint, save_train_checkpoint, train)



def main(argv):
    return cli.main(["train", *argv])


# A UNet small enough that a training step takes milliseconds on one CPU core.
TINY = ModelConfig(UNetConfig(image_channels=1, n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                              image_size=8, n_groups=4, dropout=0.0),
                   DiffusionConfig(n_steps=100))
TINY_DROPOUT = ModelConfig(UNetConfig(**{**TINY.unet.to_dict(), "dropout": 0.1}), TINY.diffusion)
QUIET = dict(progress=False, sample_every=0)


def bars(n=48, size=8, seed=0):
    """Synthetic images in [-1, 1]: one bright horizontal or vertical bar each, on a dark field."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.ones(n, 1, size, size)
    pos = torch.randint(0, size, (n,), generator=g)
    for i in range(n):
        if i % 2:
            x[i, 0, pos[i], :] = 1.0
        else:
            x[i, 0, :, pos[i]] = 1.0
    return x


def model_weights(ckpt):
    tensors, _, state = read_train_checkpoint(ckpt)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema.", "optim."))}, state


def fixed_loss(state_dict, config, data):
    """Loss of the given weights on fixed (x0, t, eps): the same draw before and after training."""
    m = UNet(config.unet)
    m.load_state_dict(state_dict)
    g = torch.Generator().manual_seed(123)
    s = Schedule(config.diffusion)
    with torch.no_grad():
        return sum(float(s.loss(m, data, generator=g)) for _ in range(4)) / 4


def saved(ckpt, prefix="model."):
    return {k[len(prefix):]: v for k, v in read_train_checkpoint(ckpt)[0].items() if k.startswith(prefix)}


# --- learning ------------------------------------------------------------------------------------
def test_a_few_steps_reduce_the_loss(tmp_path):
    data = bars()
    torch.manual_seed(0)  # train() builds its model right after seeding with `seed` (0)
    before = fixed_loss(UNet(TINY.unet).state_dict(), TINY, data)
    res = train(data, tmp_path / "r", preset=TINY, steps=30, batch_size=16, lr=3e-3, warmup_steps=0,
                checkpoint_every=30, log_every=10, **QUIET)
    after = fixed_loss(saved(res.checkpoint), TINY, data)
    assert res.step == 30
    assert after < 0.6 * before, (before, after)  # measured ~0.35x
    rows = (tmp_path / "r" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,it_per_s,elapsed_s" and len(rows) == 1 + 3
    logged = [float(r.split(",")[1]) for r in rows[1:]]
    assert logged[-1] < logged[0]
    # The model file holds the EMA weights in the model format.
    from safetensors.torch import load_file
    ema = load_file(str(res.model))
    for k, v in saved(res.checkpoint, "ema.").items():
        assert torch.equal(ema[k], v)


# --- EMA -----------------------------------------------------------------------------------------
def test_ema_decay_warmup_formula():
    assert ema_decay_at(0.999, 0) == pytest.approx(1 / 10)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.0, 5) == 0.0


def test_ema_update_matches_the_formula():
    torch.manual_seed(1)
    a, b = UNet(TINY.unet), UNet(TINY.unet)
    ema_before = {k: v.clone() for k, v in a.state_dict().items()}
    d = 0.93
    ema_update(a, b, d)
    for k, v in a.state_dict().items():
        want = d * ema_before[k] + (1 - d) * b.state_dict()[k]
        torch.testing.assert_close(v, want)
    ema_update(a, b, 0.0)  # decay 0 copies
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_ema_in_training_follows_the_recurrence(tmp_path):
    """Replay the model weights step by step and check the trainer's EMA against the recurrence."""
    data = bars(16)
    snaps = []
    out = tmp_path / "e"
    for s in range(1, 4):  # train to 1, 2, 3 steps (each resumes the previous run)
        train(data, out, preset=TINY, steps=s, batch_size=8, lr=1e-2, ema_decay=0.6, checkpoint_every=1,
              resume=s > 1, **QUIET)
        snaps.append(read_train_checkpoint(out / "checkpoint.safetensors")[0])
    torch.manual_seed(0)
    init = UNet(TINY.unet).state_dict()  # train() seeds 0 before building the model, and EMA starts there
    ema = {k: init[k].clone() for k in init}
    for s, snap in enumerate(snaps):
        d = ema_decay_at(0.6, s)
        ema = {k: d * ema[k] + (1 - d) * snap["model." + k] for k in ema}
        for k in ema:
            torch.testing.assert_close(snap["ema." + k], ema[k])


# --- checkpoints ---------------------------------------------------------------------------------
def _model_ema_opt(config=TINY, seed=0):
    torch.manual_seed(seed)
    m = UNet(config.unet)
    e = UNet(config.unet).requires_grad_(False)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.8, 0.95))
    return m, e, opt


def test_checkpoint_round_trip_is_exact(tmp_path):
    m, e, opt = _model_ema_opt()
    s = Schedule(TINY.diffusion)
    for _ in range(3):
        opt.zero_grad()
        s.loss(m, bars(8)).backward()
        opt.step()
        ema_update(e, m, 0.5)
    path = tmp_path / "ck.safetensors"
    rng = torch.get_rng_state()
    save_train_checkpoint(path, m, e, opt, 3, TINY, extra={"lr": 1e-3})
    torch.rand(10)  # move the RNG on; loading must put it back

    m2, e2, opt2 = _model_ema_opt(seed=5)
    state = load_train_checkpoint(path, m2, e2, opt2)
    assert state["step"] == 3 and state["hparams"] == {"lr": 1e-3}
    for a, b in ((m, m2), (e, e2)):
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), k
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]
    assert sd["state"].keys() == sd2["state"].keys()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd2["state"][i][k])), (i, k)
    assert torch.equal(torch.get_rng_state(), rng)
    # And the restored optimizer takes the same next step.
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.zero_grad()
        s.loss(mm, bars(8), generator=torch.Generator().manual_seed(9)).backward()
        oo.step()
    for v, v2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(v, v2)


def test_corrupt_and_wrong_checkpoints_give_clear_errors(tmp_path):
    m, e, opt = _model_ema_opt()
    good = tmp_path / "good.safetensors"
    save_train_checkpoint(good, m, e, opt, 0, TINY)
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"\x00\x01not a checkpoint" * 10, "empty": b""}
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(CheckpointError, match=f"{name}.safetensors.*corrupt"):
            load_train_checkpoint(p, *_model_ema_opt())
    with pytest.raises(CheckpointError, match="does not exist"):
        read_train_checkpoint(tmp_path / "missing.safetensors")
    # A model file (EMA weights only) is not a training checkpoint.
    model_file = export_model(good, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a ddpm_fast training checkpoint"):
        read_train_checkpoint(model_file)
    # A checkpoint of another architecture.
    other = ModelConfig(UNetConfig(**{**TINY.unet.to_dict(), "n_channels": 16}), TINY.diffusion)
    with pytest.raises(CheckpointError, match="different model"):
        load_train_checkpoint(good, *_model_ema_opt(other))


def test_export_model_casts_and_keeps_the_config(tmp_path):
    from safetensors import safe_open

    m, e, opt = _model_ema_opt()
    ck = tmp_path / "ck.safetensors"
    save_train_checkpoint(ck, m, e, opt, 7, TINY)
    out = export_model(ck, tmp_path / "half.safetensors", dtype=torch.float16)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "ddpm_fast/1"
        assert ModelConfig.from_json(meta["ddpm_fast_config"]) == TINY
        assert set(f.keys()) == set(e.state_dict())
        for k in f.keys():
            assert f.get_tensor(k).dtype == torch.float16
            torch.testing.assert_close(f.get_tensor(k).float(), e.state_dict()[k], rtol=1e-3, atol=1e-4)


# --- resume --------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    data = bars(32)
    # On the CPU: bitwise equality is the claim, and CUDA's backward kernels (atomic adds in the
    # conv weight gradients) are not bitwise reproducible even without a resume (seen on an H100).
    kw = dict(preset=TINY_DROPOUT, steps=7, batch_size=8, lr=2e-3, checkpoint_every=3, log_every=1,
              device="cpu", **QUIET)
    full = train(data, tmp_path / "full", **kw)

    def crash_at_5(step):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(data, tmp_path / "cut", callback=crash_at_5, **kw)
    assert read_train_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")[2]["step"] == 3
    with pytest.raises(FileExistsError, match="resume"):  # never silently overwrite a run
        train(data, tmp_path / "cut", **kw)
    seen = []
    res = train(data, tmp_path / "cut", resume=True, callback=seen.append, **kw)
    assert seen == [4, 5, 6, 7] and res.step == 7
    a, _ = model_weights(full.checkpoint)
    b, _ = model_weights(res.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: data order, noise and dropout RNG all resumed
    steps = [int(r.split(",")[0]) for r in (tmp_path / "cut" / "loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 8))  # rows the crashed run logged past its checkpoint were dropped
    # Resuming a finished run is a no-op; resuming nothing starts a new run (a job script may always pass it).
    assert train(data, tmp_path / "cut", resume=True, **kw).step == 7
    fresh = train(data, tmp_path / "none", resume=True, **kw)
    assert fresh.step == 7 and torch.equal(model_weights(fresh.checkpoint)[0][k], a[k])


def test_ctrl_c_writes_a_checkpoint_and_stops(tmp_path):
    def interrupt_at_3(step):
        if step == 3:
            # Lands after step 3 was already judged, like a Ctrl-C during step 4: step 4 finishes,
            # is checkpointed, then the run stops.
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(bars(16), tmp_path / "r", preset=TINY, steps=50, batch_size=8, checkpoint_every=100,
              callback=interrupt_at_3, **QUIET)
    assert read_train_checkpoint(tmp_path / "r" / "checkpoint.safetensors")[2]["step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_training import TINY, bars
    from ddpm_fast.training import train
    train(bars(32), {out!r}, preset=TINY, steps=100000, batch_size=8, checkpoint_every=2, log_every=1,
          progress=False, sample_every=0)
""")


def test_sigkill_loses_at_most_the_work_since_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = out / "checkpoint.safetensors"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if ck.exists() and read_train_checkpoint(ck)[2]["step"] >= 6:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("the training subprocess wrote no checkpoint in time")
        time.sleep(0.3)  # kill somewhere mid-run, likely inside a step or a checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = read_train_checkpoint(ck)[2]["step"]  # never torn: the rename is atomic
    assert step >= 6 and step % 2 == 0
    seen = []
    res = train(bars(32), out, preset=TINY, steps=step + 2, batch_size=8, checkpoint_every=2, resume=True,
                callback=seen.append, **QUIET)
    assert seen == [step + 1, step + 2] and res.step == step + 2
    assert not list(out.glob(".*tmp*"))  # temp files a kill left behind are cleaned up


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(amp, tmp_path):
    data = bars()
    torch.manual_seed(0)
    before = fixed_loss(UNet(TINY.unet).state_dict(), TINY, data)
    kw = dict(preset=TINY, batch_size=16, lr=3e-3, warmup_steps=0, amp=amp, device="cuda", checkpoint_every=20,
              **QUIET)
    res = train(data, tmp_path / "r", steps=40, **kw)
    after = fixed_loss(saved(res.checkpoint), TINY, data)
    assert after < 0.6 * before, (before, after)
    state = read_train_checkpoint(res.checkpoint)[2]
    assert state["hparams"]["amp"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert (state["scaler"] is not None) == (amp == "fp16")  # GradScaler only for fp16
    assert train(data, tmp_path / "r", steps=42, resume=True, **kw).step == 42


# --- data ----------------------------------------------------------------------------------------
def _png(path, size=(12, 10), mode="RGB", value=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    arr = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_image_folder_resizes_crops_and_scales(tmp_path):
    from PIL import Image

    _png(tmp_path / "a.png", size=(20, 10))
    _png(tmp_path / "sub" / "b.jpg", size=(9, 30), mode="L")
    # A wide image: left third black, middle white, right third black -> the centre crop is white.
    arr = np.zeros((30, 90), np.uint8)
    arr[:, 30:60] = 255
    Image.fromarray(arr, mode="L").save(tmp_path / "sub" / "c.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, image_size=8, channels=1)
    assert [p.name for p in ds.files] == ["a.png", "b.jpg", "c.png"]
    x = torch.stack([ds[i] for i in range(len(ds))])
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.all(x[2, 0, :, 2:6] > 0.9)  # the centre of a 90x30 image, not a squashed copy
    rgb = ImageFolder(tmp_path, image_size=8, channels=3, data_range=(0.0, 1.0))
    assert rgb[1].shape == (3, 8, 8) and rgb[1].min() >= 0.0
    torch.testing.assert_close(rgb[1][0], rgb[1][2])  # grayscale replicated to RGB


def test_16_bit_and_transparent_images(tmp_path):
    from PIL import Image

    from ddpm_fast.training.data import load_image

    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white16.png")  # mode I;16
    assert torch.all(load_image(tmp_path / "white16.png", 4, 1) == 1.0)  # not clipped at 255/65535
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(tmp_path / "clear.png")
    assert torch.all(load_image(tmp_path / "clear.png", 4, 3) == 1.0)  # transparent -> white


def test_bad_data_folders_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 8, 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="contains no images"):
        ImageFolder(tmp_path / "empty", 8, 1)
    _png(tmp_path / "bad" / "good.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolder(tmp_path / "bad", 8, 1)
    _png(tmp_path / "trunc" / "t.png", size=(64, 64))
    blob = (tmp_path / "trunc" / "t.png").read_bytes()
    (tmp_path / "trunc" / "t.png").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="t.png"):
        ImageFolder(tmp_path / "trunc", 8, 1)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder(tmp_path / "file.png", 8, 1)
    with pytest.raises(DataError, match=r"shape \[1, 8, 8\]"):
        load_dataset(torch.zeros(4, 3, 8, 8) + 0.5, TINY)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(torch.rand(4, 1, 8, 8), tmp_path / "small", preset=TINY, steps=1, batch_size=8, **QUIET)


def test_training_on_an_image_folder(tmp_path):
    for i in range(10):
        _png(tmp_path / "imgs" / f"{i}.png", size=(10, 12), mode="RGB")
    kw = dict(preset=TINY, steps=2, batch_size=4, checkpoint_every=1, **QUIET)
    cached = train(tmp_path / "imgs", tmp_path / "run", **kw)  # small folder: decoded once, in memory
    # The DataLoader path (no cache) sees the same batches, so it trains to the same weights.
    streamed = train(ImageFolder(tmp_path / "imgs", 8, 1, cache=False), tmp_path / "run2", **kw)
    assert cached.step == streamed.step == 2
    a, b = saved(cached.checkpoint), saved(streamed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A file that breaks after the up-front check still fails with its name when it is decoded.
    (tmp_path / "imgs" / "0.png").write_bytes(b"garbage")
    lazy = ImageFolder(tmp_path / "imgs", 8, 1, cache=False, verify=False)
    with pytest.raises(DataError, match="0.png"):
        train(lazy, tmp_path / "run3", **kw)


def test_digits_dataset():
    ds = digits_dataset(16)
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.min() == -1.0 and ds.images.max() <= 1.0 and ds.images.max() > 0.99
    assert len(load_dataset("digits", ModelConfig(UNetConfig(**{**TINY.unet.to_dict(), "image_size": 16})))) == 1797


def test_digits_needs_scikit_learn(monkeypatch):
    from ddpm_fast.training import data

    data._digits_cached.cache_clear()  # force a fresh import of scikit-learn
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"ddpm_fast\[data\]"):
        digits_dataset(16)
    with pytest.raises(DataError, match=r"needs scikit-learn"):
        load_dataset("digits", ModelConfig(UNetConfig(**{**TINY.unet.to_dict(), "image_size": 16})))


# --- arguments -----------------------------------------------------------------------------------
def _parse(argv):
    return add_train_arguments(argparse.ArgumentParser(prog="train")).parse_args(argv)


@pytest.mark.parametrize("flags, msg", [
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--steps", "ten"], "--steps: expected an integer"),
    (["--lr", "-1"], "--lr: must be in"),
    (["--lr", "nan"], "--lr: must be in"),
    (["--ema-decay", "1"], "--ema-decay: must be in"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--preset", "nope"], "--preset: invalid choice"),
    (["--amp", "fp8"], "--amp: invalid choice"),
], ids=["steps0", "steps-text", "lr-neg", "lr-nan", "ema1", "batch0", "preset", "amp"])
def test_cli_rejects_bad_arguments(flags, msg, capsys):
    with pytest.raises(SystemExit):
        _parse(["--data", "digits", "--out", "x"] + flags)
    assert msg in capsys.readouterr().err


def test_cli_requires_data_and_out(capsys):
    with pytest.raises(SystemExit):
        _parse(["--steps", "3"])
    assert "--data" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, msg", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(lr=0.0), "lr must be a positive"),
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(amp="bf16"), "needs a CUDA device"),
    (dict(preset="nope"), "unknown preset"),
], ids=["steps", "batch", "lr", "ema", "ckpt", "amp", "preset"])
def test_train_validates_arguments(kwargs, msg, tmp_path):
    if "amp" in kwargs and torch.cuda.is_available():
        pytest.skip("amp is valid with CUDA")
    kw = dict(preset=TINY, steps=1, batch_size=4, device="cpu", **QUIET)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        train(bars(8), tmp_path / "r", **kw)


def test_cli_end_to_end_and_errors(tmp_path, capsys):
    for i in range(6):
        _png(tmp_path / "imgs" / f"{i}.png", size=(16, 16), mode="L")
    out = tmp_path / "run"
    common = ["--data", str(tmp_path / "imgs"), "--out", str(out), "--preset", "tiny", "--image-size", "8",
              "--channels", "1", "--batch-size", "2", "--sample-every", "0", "--no-progress"]
    args = common + ["--steps", "2"]
    assert main(args) == 0
    assert "trained to step 2" in capsys.readouterr().out
    _, cfg, state = read_train_checkpoint(out / "checkpoint.safetensors")
    assert (cfg.unet.image_size, cfg.unet.image_channels, state["step"]) == (8, 1, 2)
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # refuses to overwrite
    assert main(common + ["--steps", "4", "--resume"]) == 0
    assert read_train_checkpoint(out / "checkpoint.safetensors")[2]["step"] == 4
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            run_train_from_args(_parse(["--data", "digits", "--out", "x", "--amp", "bf16"]))


def test_torchrun_two_processes_train_and_resume_cpu(tmp_path):
    # DistributedDataParallel through torchrun, on the CPU (gloo): the same code path as a multi-GPU
    # node (NCCL), minus the devices. Two processes train, rank 0 writes; a second launch resumes.
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MASTER_", "WORLD_", "RANK"))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU even where a GPU is visible

    def launch(steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "ddpm_fast", "train", "--data", "digits", "--preset", "tiny", "--steps", str(steps),
               "--batch-size", "8", "--out", str(out), "--checkpoint-every", "3", "--sample-every", "0",
               "--no-progress", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return read_train_checkpoint(out / "checkpoint.safetensors")[2]

    state = launch(4)
    assert state["step"] == 4 and state["hparams"]["world_size"] == 2
    assert launch(6, "--resume")["step"] == 6
    assert (out / "model.safetensors").exists()


def test_the_ddpm_paper_network_trains_resumes_and_loads(tmp_path):
    # train() builds whichever network the config names: a DDPMUNetConfig gives a DDPMUNet, resumable
    # bitwise like the labml UNet, and its model file loads back as a DDPMUNet.
    from ddpm_fast.config import DDPMUNetConfig
    from ddpm_fast.io import load_checkpoint
    from ddpm_fast.reference import DDPMUNet

    cfg = ModelConfig(DDPMUNetConfig(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                     norm_num_groups=4), DiffusionConfig(n_steps=100))
    kw = dict(preset=cfg, steps=4, batch_size=8, lr=2e-3, checkpoint_every=2, log_every=1, device="cpu", **QUIET)
    full = train(bars(32), tmp_path / "full", **kw)

    def crash_at_3(step):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(bars(32), tmp_path / "cut", callback=crash_at_3, **kw)
    res = train(bars(32), tmp_path / "cut", resume=True, **kw)
    a, b = model_weights(full.checkpoint)[0], model_weights(res.checkpoint)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model, config = load_checkpoint(tmp_path / "full")
    assert isinstance(model, DDPMUNet) and config == cfg


def test_cli_trains_a_ddpm_preset_with_its_size_overridden(tmp_path):
    # --image-size / --channels map onto diffusers' names (sample_size, in/out_channels) for a DDPM preset.
    from ddpm_fast.io import load_checkpoint
    from ddpm_fast.reference import DDPMUNet

    assert main(["--data", "digits", "--preset", "ddpm-cifar10", "--image-size", "8", "--channels", "1", "--steps",
                 "1", "--batch-size", "2", "--out", str(tmp_path / "r"), "--no-progress", "--sample-every", "0"]) == 0
    model, config = load_checkpoint(tmp_path / "r")
    assert isinstance(model, DDPMUNet)
    assert (config.unet.sample_size, config.unet.in_channels, config.unet.out_channels) == (8, 1, 1)
