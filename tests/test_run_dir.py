"""A training run's folder and its failure modes: restarts after an early kill, foreign files, two
writers, divergence (NaN), a stale model file, the config taken from the checkpoint, damaged
train_state metadata, and the train command's device / size / seed arguments."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm_fast.training.run_dir import RunLock, model_file_step
from ddpm_fast.io.checkpoint import TRAIN_FORMAT
from ddpm_fast import cli
from ddpm_fast.training import (CheckpointError, DivergedError, LOSS_COLUMNS, read_train_checkpoint,
                                train)

from test_training import QUIET, TINY, bars


def main(argv):
    return cli.main(["train", *argv])

KW = dict(preset=TINY, batch_size=8, lr=2e-3, device="cpu", **QUIET)


def log_steps(out):
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == ",".join(LOSS_COLUMNS)
    return [int(r.split(",")[0]) for r in rows[1:]]


class Stop(Exception):
    pass


def stop_at(n):
    def cb(step):
        if step == n:
            raise Stop
    return cb


def test_a_run_killed_before_its_first_checkpoint_restarts_with_a_fresh_log(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(bars(16), out, steps=6, checkpoint_every=5, log_every=1, callback=stop_at(3), **KW)
    assert log_steps(out) == [1, 2, 3] and not (out / "checkpoint.safetensors").exists()
    # A job script that always passes resume: no checkpoint yet, so a new run, and a new log.
    train(bars(16), out, steps=6, checkpoint_every=5, log_every=1, resume=True, **KW)
    assert log_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name, text", [("loss.csv", "epoch,accuracy\n1,0.5\n"), ("model.safetensors", "x")])
def test_a_new_run_refuses_files_it_did_not_write(tmp_path, name, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_text(text)
    with pytest.raises(FileExistsError, match=name):
        train(bars(16), out, steps=1, **KW)
    assert (out / name).read_text() == text and sorted(p.name for p in out.iterdir()) == [name]


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(bars(4), tmp_path / "run", steps=1, **KW)
    assert not (tmp_path / "run").exists()


def test_one_writer_per_run_folder(tmp_path):
    out = tmp_path / "run"
    held = RunLock(out)
    try:
        with pytest.raises(FileExistsError, match="in use by another training process"):
            train(bars(16), out, steps=1, **KW)
    finally:
        held.release(started=True)
    assert train(bars(16), out, steps=1, **KW).step == 1  # free again once released


def test_divergence_is_a_clear_error_and_never_checkpointed(tmp_path):
    out = tmp_path / "nan"
    kw = dict(KW, lr=1e30, warmup_steps=0, grad_clip=None)
    # Logged every 50 steps, checkpointed every 5: the weights check must catch it, not the log.
    with pytest.raises(DivergedError, match="weights became NaN or Inf at step 5.*no checkpoint was written") as e:
        train(bars(16), out, steps=20, checkpoint_every=5, log_every=50, **kw)
    assert isinstance(e.value, ValueError)  # the CLI's one-line path
    assert not (out / "checkpoint.safetensors").exists()
    # After good checkpoints, the message names the last one, which holds finite weights only.
    good = tmp_path / "good"
    train(bars(16), good, steps=2, checkpoint_every=1, **KW)
    with pytest.raises(DivergedError, match=r"from step (\d+)") as e:
        train(bars(16), good, steps=20, checkpoint_every=1, log_every=50, resume=True, **kw)
    tensors, _, state = read_train_checkpoint(good / "checkpoint.safetensors")
    assert f"from step {state['step']}" in str(e.value) and all(bool(torch.isfinite(v).all()) for k, v in tensors.items()
                                      if v.is_floating_point())


def test_a_stale_model_file_is_exported_again_on_resume(tmp_path):
    out = tmp_path / "run"
    train(bars(16), out, steps=2, checkpoint_every=1, **KW)
    assert model_file_step(out / "model.safetensors") == 2
    # A kill between the checkpoint write and the model-file write at the last step: an older model file.
    old = load_file(out / "model.safetensors")
    save_file({k: v + 1 for k, v in old.items()}, out / "model.safetensors",
              metadata={"format": "ddpm_fast/1", "ddpm_fast_config": TINY.to_json(), "train_step": "1"})
    train(bars(16), out, steps=2, resume=True, **KW)
    assert model_file_step(out / "model.safetensors") == 2
    fresh = load_file(out / "model.safetensors")
    assert all(torch.equal(fresh[k], old[k]) for k in old)


def test_resume_takes_the_checkpoints_config_and_checks_a_given_one_first(tmp_path):
    out = tmp_path / "run"
    train(bars(16), out, steps=1, **KW)
    kw = {k: v for k, v in KW.items() if k != "preset"}
    assert train(bars(16), out, steps=2, resume=True, **kw).step == 2  # no preset: the checkpoint's
    # A different preset is refused before the data is read (here the data does not even exist).
    with pytest.raises(CheckpointError, match="another model config"):
        train(tmp_path / "no-such-folder", out, steps=3, resume=True, preset="tiny", **kw)


def test_elapsed_time_continues_across_a_resume(tmp_path):
    out = tmp_path / "run"
    train(bars(16), out, steps=2, checkpoint_every=1, log_every=1, **KW)
    _, _, state = read_train_checkpoint(out / "checkpoint.safetensors")
    saved = state["hparams"]["elapsed_s"]
    train(bars(16), out, steps=3, log_every=1, resume=True, **KW)
    rows = (out / "loss.csv").read_text().splitlines()[1:]
    assert float(rows[-1].split(",")[-1]) >= saved


def _rewrite_state(path, **changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(meta["train_state"])
    state.update(changes)
    meta["train_state"] = json.dumps(state)
    assert meta["format"] == TRAIN_FORMAT
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("changes, msg", [
    (dict(step=-5), "step must be an integer >= 0"),
    (dict(step=10 ** 30), "step must be an integer >= 0"),
    (dict(optim_param_groups=[1]), "optim_param_groups"),
    (dict(optim_param_groups="x"), "optim_param_groups"),
    (dict(optim_scalars=[1]), "optim_scalars"),
], ids=["negative-step", "huge-step", "groups-int", "groups-str", "scalars-list"])
def test_damaged_train_state_is_refused(tmp_path, changes, msg):
    out = tmp_path / "run"
    train(bars(16), out, steps=1, **KW)
    _rewrite_state(out / "checkpoint.safetensors", **changes)
    with pytest.raises(CheckpointError, match=msg):
        train(bars(16), out, steps=2, resume=True, **KW)


def test_a_checkpoint_without_optimizer_state_is_refused(tmp_path):
    out = tmp_path / "run"
    train(bars(16), out, steps=1, **KW)
    path = out / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optim.")}
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CheckpointError, match="no usable optimizer state"):
        train(bars(16), out, steps=2, resume=True, **KW)


@pytest.mark.parametrize("args, msg", [
    (["--device", "meta"], "not supported"),
    (["--device", "mps"], "not supported"),
    (["--device", ""], "must not be empty"),
    (["--out", ""], "out_dir must be a folder path"),
    (["--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0", "--steps", "20", "--log-every", "1"],
     "loss became"),
], ids=["meta", "mps", "empty-device", "empty-out", "diverged"])
def test_train_command_errors_are_one_line(tmp_path, capsys, args, msg):
    base = {"--data": "digits", "--out": str(tmp_path / "r"), "--preset": "tiny", "--steps": "1",
            "--batch-size": "8", "--sample-every": "0"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [x for kv in base.items() for x in kv] + ["--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("flag, value", [("--seed", str(2 ** 64)), ("--image-size", "100000")])
def test_train_command_bounds(tmp_path, capsys, flag, value):
    assert main(["--data", "digits", "--out", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error: ") and flag in err and err.count("\n") == 1
