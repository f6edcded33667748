"""Checkpoints: the safetensors round trip, every bad-file error, and labml .pt state_dicts."""
import json
import os
import pickle
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ddpm_fast.io.state as state_module
from ddpm_fast import (PRESETS, DiffusionConfig, ModelConfig, UNet, UNetConfig, default_checkpoint_path,
                       get_preset, load_checkpoint, load_labml_state_dict, sample, save_checkpoint)
from ddpm_fast.io.checkpoint import CONFIG_KEY, FORMAT, load_extra_tensors
from ddpm_fast.training.checkpoint import TRAIN_FORMAT, save_train_checkpoint

CFG = ModelConfig(UNetConfig(image_channels=1, n_channels=16, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1,
                             image_size=8, n_groups=4),
                  DiffusionConfig(n_steps=100, beta_start=2e-4, beta_end=0.03, data_range=(0.0, 1.0)))


@pytest.fixture()
def model():
    return UNet(CFG.unet)


@pytest.fixture()
def ckpt(tmp_path, model):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, CFG)
    return path


def _state(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _rewrite(path, state, metadata):
    save_file(state, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------
def test_round_trip_is_exact(ckpt, model):
    loaded, cfg = load_checkpoint(ckpt)
    assert cfg == CFG and loaded.config == CFG.unet
    want = model.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert not loaded.training  # ready to sample
    model.eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 90])
    assert torch.equal(loaded(x, t), model(x, t))


def test_one_file_with_our_metadata_and_no_temp_left(ckpt):
    assert os.listdir(ckpt.parent) == ["m.safetensors"]
    _, meta = _state(ckpt)
    assert meta["format"] == FORMAT and ModelConfig.from_json(meta[CONFIG_KEY]) == CFG


def test_extra_tensors_round_trip(tmp_path, model):
    flat = torch.randn(10)
    extras = {"ema.image_proj.weight": torch.randn(16, 1, 3, 3), "step": torch.tensor(1234), "a": flat[:4],
              "b": flat[4:]}  # views of one buffer are fine
    path = save_checkpoint(tmp_path / "e.safetensors", model, CFG, extra_tensors=extras)
    back = load_extra_tensors(path)
    assert set(back) == set(extras) and all(torch.equal(back[k], extras[k]) for k in extras)
    load_checkpoint(path)  # extras do not disturb the model's strict key check
    assert load_extra_tensors(save_checkpoint(tmp_path / "n.safetensors", model, CFG)) == {}


def test_load_in_another_dtype_and_overwrite(tmp_path, model):
    path = save_checkpoint(tmp_path / "m.safetensors", model, CFG)
    half, _ = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    other = UNet(CFG.unet)
    save_checkpoint(path, other, CFG)  # replaces atomically
    back, _ = load_checkpoint(path)
    assert torch.equal(back.final.weight, other.final.weight)
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_dtype_names_as_sample_takes_them(ckpt, tmp_path, model):
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded, _ = load_checkpoint(ckpt, dtype=name)
        assert all(p.dtype == dtype for p in loaded.parameters()), name
    sd_path = tmp_path / "m.pt"
    torch.save(model.state_dict(), sd_path)
    assert load_labml_state_dict(sd_path, CFG, dtype="fp16")[0].final.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        load_checkpoint(ckpt, dtype="half")
    with pytest.raises(ValueError, match="dtype must be"):
        load_checkpoint(ckpt, dtype=torch.int8)


def test_save_rejects_model_that_does_not_match_config(tmp_path, model):
    with pytest.raises(ValueError, match="does not match config.unet"):
        save_checkpoint(tmp_path / "x.safetensors", model, get_preset("tiny"))
    with pytest.raises(TypeError, match="ModelConfig"):
        save_checkpoint(tmp_path / "x.safetensors", model, CFG.unet)
    with pytest.raises(ValueError, match="not a tensor"):
        save_checkpoint(tmp_path / "x.safetensors", model, CFG, extra_tensors={"a": 1.0})
    with pytest.raises(ValueError, match="does not exist"):
        save_checkpoint(tmp_path / "nodir" / "x.safetensors", model, CFG)
    assert os.listdir(tmp_path) == []


def test_save_onto_a_directory_names_it(tmp_path, model):
    # Not an IsADirectoryError about a temporary file: a ValueError naming the path.
    target = tmp_path / "run"
    target.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"cannot save {target}: it is a directory")):
        save_checkpoint(target, model, CFG)
    assert os.listdir(target) == [] and os.listdir(tmp_path) == ["run"]


def test_failed_save_leaves_no_file(tmp_path, model, monkeypatch):
    # The bytes are written, then the disk "fills" at fsync: no file, no temp file may remain, and an
    # existing checkpoint at the target path must stay untouched.
    import ddpm_fast.io.atomic as atomic

    target = tmp_path / "m.safetensors"
    save_checkpoint(target, model, CFG)
    before = target.read_bytes()

    def full_disk(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, model, CFG)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert target.read_bytes() == before


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    from ddpm_fast.io.atomic import write_atomic

    def partial(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x.bin", partial)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Bad files: every error is a ValueError (FileNotFoundError when missing) naming the file
# --------------------------------------------------------------------------------------------
def _expect_error(path, match, exc=ValueError):
    with pytest.raises(exc, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.safetensors", "not found", FileNotFoundError)
    _expect_error(tmp_path, "not a file, nor a training run folder")
    with pytest.raises(ValueError, match="path is empty"):  # not the current directory
        load_checkpoint("")


def test_random_bytes(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    _expect_error(path, "not a valid safetensors file")


def test_corrupt_header(ckpt):
    data = bytearray(ckpt.read_bytes())
    data[8:16] = b"\x00garbag"  # inside the JSON header
    ckpt.write_bytes(bytes(data))
    _expect_error(ckpt, "not a valid safetensors file")


@pytest.mark.parametrize("keep", [0.5, 0.999, 6 / 4096])
def test_truncated_file(ckpt, keep):
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: max(1, int(len(data) * keep))])
    _expect_error(ckpt, "not a valid safetensors file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _expect_error(path, "not a valid safetensors file")


def test_pt_file_gets_a_hint(tmp_path, model):
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    _expect_error(path, "load_labml_state_dict")


def test_wrong_shape_tensor(ckpt):
    state, meta = _state(ckpt)
    state["final.weight"] = torch.randn(1, 16, 5, 5)
    _expect_error(_rewrite(ckpt, state, meta), r"shape mismatch.*final\.weight \(1, 16, 5, 5\) \(expected \(1, 16, 3, 3\)\)")


def test_missing_key(ckpt):
    state, meta = _state(ckpt)
    del state["middle.attn.projection.bias"]
    _expect_error(_rewrite(ckpt, state, meta), r"1 missing key\(s\): middle\.attn\.projection\.bias")


def test_unexpected_key(ckpt):
    state, meta = _state(ckpt)
    state["middle.attn.bonus"] = torch.zeros(3)
    _expect_error(_rewrite(ckpt, state, meta), r"1 unexpected key\(s\): middle\.attn\.bonus")


def test_config_of_another_model(ckpt):
    state, meta = _state(ckpt)
    meta[CONFIG_KEY] = get_preset("tiny").to_json()
    _expect_error(_rewrite(ckpt, state, meta), "do not match the UNet of its config")


@pytest.mark.parametrize("meta,match", [
    (None, "not a ddpm_fast checkpoint"), ({"format": FORMAT}, "not a ddpm_fast checkpoint"),
    ({"format": "ddpm_fast/99", CONFIG_KEY: CFG.to_json()}, "not a ddpm_fast checkpoint"),
    ({"format": FORMAT, CONFIG_KEY: "{not json"}, "bad config.*not valid JSON"),
    ({"format": FORMAT, CONFIG_KEY: json.dumps({"unet": {"n_channels": -4}})}, "bad config.*n_channels"),
    ({"format": FORMAT, CONFIG_KEY: json.dumps({"unet": {}, "extra": 1})}, "bad config"),
    ({"format": FORMAT, CONFIG_KEY: "[1, 2]"}, "bad config"),
])
def test_bad_metadata(ckpt, meta, match):
    state, _ = _state(ckpt)
    _expect_error(_rewrite(ckpt, state, meta), match)


def _config_with(**changes):
    d = CFG.to_dict()
    for key, value in changes.items():
        section, field = key.split("__")
        d[section][field] = value
    return json.dumps(d)


# Each of these used to crash (RuntimeError: Storage size calculation overflowed), take a minute and
# gigabytes to refuse, or load and then fail (or sample NaN) later.
@pytest.mark.parametrize("changes,match", [
    ({"unet__ch_mults": [1, 10 ** 12]}, r"n_channels \* product\(ch_mults\)"),
    ({"unet__ch_mults": [1, 1e12]}, r"ch_mults must be a list of ints"),
    ({"unet__n_channels": 8 * 10 ** 9}, r"n_channels \* product\(ch_mults\)"),
    ({"unet__n_blocks": 10 ** 4}, "n_blocks must be <= 64"),
    ({"unet__image_size": 2 ** 31}, "image_size must be <= 4096"),
    ({"unet__n_heads": 2 ** 20}, r"n_heads \* d_k"),
    ({"unet__d_k": True}, "d_k must be None or a positive int"),
    ({"unet__is_attn": ["no", "no"]}, "is_attn must be a list of booleans"),
    ({"diffusion__n_steps": 2 ** 40}, r"n_steps must be an int in \[2, 100000\]"),
    ({"diffusion__data_range": [float("-inf"), float("inf")]}, "data_range values must be finite"),
    ({"diffusion__data_range": [-1e308, 1e308]}, "data_range values must be finite"),
    ({"diffusion__beta_start": 0.5, "diffusion__beta_end": 0.99999}, "alpha_bar = 4.02e-77 at the last step"),
])
def test_hostile_config(ckpt, changes, match):
    state, _ = _state(ckpt)
    meta = {"format": FORMAT, CONFIG_KEY: _config_with(**changes)}
    _expect_error(_rewrite(ckpt, state, meta), "bad config.*" + match)


@pytest.mark.parametrize("kwargs,match", [
    (dict(data_range=(float("-inf"), float("inf"))), "data_range values must be finite"),
    (dict(data_range=(float("nan"), 1.0)), "data_range values must be finite"),
    (dict(data_range=(-1e308, 1e308)), r"\|value\| <= 1e\+06"),
    (dict(data_range=(1.0, 1.0 + 1e-9)), "low < high"),
    (dict(data_range=(1.0, 0.0)), "low < high"),
    (dict(data_range=("0", 1.0)), "two numbers"),
    (dict(data_range=(0.0, 1.0, 2.0)), "two numbers"),
    (dict(beta_start=0.5, beta_end=0.99999), "alpha_bar = 0 at the last step"),
    (dict(beta_end=0.2), r"alpha_bar = .* below 1e-30"),
    (dict(beta_start=0.02, beta_end=0.02), "beta_start < beta_end"),
    (dict(beta_start=True), "beta_start < beta_end"),
    (dict(n_steps=100_001, beta_end=1e-3), r"n_steps must be an int in \[2, 100000\]"),
])
def test_diffusion_config_refuses_schedules_that_sample_nan(kwargs, match):
    with pytest.raises(ValueError, match="DiffusionConfig: .*" + match):
        DiffusionConfig(**kwargs)


def test_diffusion_config_at_its_bounds_samples_finite_images(tmp_path, model):
    # The widest data range with the harshest schedule allowed: every sampler stays finite (the
    # schedule just past the bound, alpha_bar ~ 1e-47, gave all-NaN images).
    cfg = DiffusionConfig(n_steps=1000, beta_end=0.1318, data_range=(-1e6, 1e6))
    assert 1e-30 <= cfg.final_alpha_bar() < 2e-30
    assert DiffusionConfig(n_steps=100_000, beta_start=1e-5, beta_end=1e-4).n_steps == 100_000
    path = save_checkpoint(tmp_path / "edge.safetensors", model, ModelConfig(CFG.unet, cfg))
    for kw in (dict(num_inference_steps=1000), dict(num_inference_steps=3),
               dict(sampler="ddim", num_inference_steps=20),
               dict(num_inference_steps=50, variant="posterior", clip_x0=True)):
        x = sample(path, batch_size=1, output_type="pt", progress=False, device="cpu",
                   generator=torch.Generator().manual_seed(0), **kw)
        assert x.isfinite().all(), kw


def test_config_asking_for_many_blocks_is_refused_before_building(ckpt, monkeypatch):
    # A valid config at the bounds (8 levels x 64 blocks: ~1 s to build even on the meta device) in a
    # file with a handful of tensors is refused from the count alone.
    state, _ = _state(ckpt)
    big = UNetConfig(image_channels=1, n_channels=16, ch_mults=(1,) * 8, is_attn=(False,) * 8, n_blocks=64,
                     image_size=128, n_groups=4)
    built = []
    monkeypatch.setattr(state_module, "_expected_shapes", lambda cfg: built.append(cfg) or {})
    meta = {"format": FORMAT, CONFIG_KEY: ModelConfig(big, CFG.diffusion).to_json()}
    _expect_error(_rewrite(ckpt, state, meta), rf"do not match the UNet of its config: {len(state)} tensor\(s\), "
                                               "but that UNet has at least")
    assert built == []


@pytest.mark.parametrize("cfg", [p.unet for p in PRESETS.values()] + [
    CFG.unet, UNetConfig(image_channels=1, n_channels=16, ch_mults=(1, 2, 1, 1, 2, 1, 1, 1), is_attn=(True,) * 8,
                         n_blocks=3, image_size=128, n_groups=4, n_heads=2, d_k=8)])
def test_min_tensor_count_is_a_lower_bound(cfg):
    assert state_module._min_tensor_count(cfg) <= len(state_module._expected_shapes(cfg))


def test_failure_to_build_the_unet_names_the_file(ckpt, monkeypatch):
    def overflow(cfg):
        raise RuntimeError("Storage size calculation overflowed with sizes=[32000000000000, 3]")

    monkeypatch.setattr(state_module, "_expected_shapes", overflow)
    _expect_error(ckpt, "cannot build the UNet of its config: RuntimeError: Storage size calculation overflowed")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor(ckpt, bad):
    state, meta = _state(ckpt)
    state["down.0.res.conv1.weight"][0, 0, 0, 0] = bad
    _expect_error(_rewrite(ckpt, state, meta), r"NaN or Inf: down\.0\.res\.conv1\.weight")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_tensor_of_unsupported_dtype(ckpt, dtype):
    # float8 used to reach isfinite, which raised NotImplementedError.
    state, meta = _state(ckpt)
    state["final.bias"] = torch.zeros(1).to(dtype)
    _expect_error(_rewrite(ckpt, state, meta), rf"float16, bfloat16, float32 or float64: final\.bias \({dtype}\)")


@pytest.mark.parametrize("device,match", [("gpu7", "not a device name"), ("meta", "not supported"),
                                          ("mps", "not supported"), ("xpu", "not supported"),
                                          ("cuda:7", "CUDA|CUDA device")])
def test_bad_device(ckpt, device, match):
    # meta used to load silently into weights without data; mps/xpu failed inside torch.
    for load in (lambda: load_checkpoint(ckpt, device=device), lambda: load_extra_tensors(ckpt, device=device)):
        with pytest.raises(ValueError, match=match) as info:
            load()
        assert str(ckpt) in str(info.value) and device in str(info.value)


# --------------------------------------------------------------------------------------------
# What training writes: a training checkpoint (its EMA weights) and a run folder
# --------------------------------------------------------------------------------------------
def _train_checkpoint(path, model):
    torch.manual_seed(1)
    ema = UNet(CFG.unet)  # differs from `model`: the loader must pick the EMA copy
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 1, 8, 8), torch.tensor([3])).square().mean().backward()
    optimizer.step()
    save_train_checkpoint(path, model, ema, optimizer, 5, CFG)
    return ema


def _assert_weights(loaded, module):
    want = module.state_dict()
    assert set(loaded.state_dict()) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_training_checkpoint_loads_its_ema_weights(tmp_path, model):
    path = tmp_path / "checkpoint.safetensors"
    ema = _train_checkpoint(path, model)
    assert _state(path)[1]["format"] == TRAIN_FORMAT
    loaded, cfg = load_checkpoint(path, dtype="fp32")
    assert cfg == CFG and not loaded.training
    _assert_weights(loaded, ema)


def test_run_folder_loads_model_file_else_training_checkpoint(tmp_path, model):
    run = tmp_path / "run"
    run.mkdir()
    ema = _train_checkpoint(run / "checkpoint.safetensors", model)
    _assert_weights(load_checkpoint(run)[0], ema)
    exported = UNet(CFG.unet)
    save_checkpoint(run / "model.safetensors", exported, CFG)
    _assert_weights(load_checkpoint(str(run))[0], exported)


@pytest.mark.parametrize("edit,match", [
    (lambda st: st["ema.final.bias"].fill_(float("nan")), r"NaN or Inf: final\.bias"),
    (lambda st: st.pop("ema.final.bias"), r"\(ema\.\* tensors\): 1 missing key\(s\): final\.bias"),
    (lambda st: st.__setitem__("ema.final.bias", torch.zeros(2)), r"final\.bias \(2,\) \(expected \(1,\)\)"),
    (lambda st: st.__setitem__("ema.final.bias", torch.zeros(1, dtype=torch.float8_e5m2)), "float16, bfloat16"),
])
def test_training_checkpoint_is_validated_like_a_model_file(tmp_path, model, edit, match):
    path = tmp_path / "checkpoint.safetensors"
    _train_checkpoint(path, model)
    state, meta = _state(path)
    edit(state)
    _expect_error(_rewrite(path, state, meta), match)


# --------------------------------------------------------------------------------------------
# labml .pt state_dicts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "ddp"])
def test_labml_state_dict_loads(tmp_path, model, wrap):
    sd = model.state_dict()
    obj = {"bare": sd, "model": {"model": sd, "step": 10}, "state_dict": {"state_dict": sd, "epoch": 3},
           "ddp": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "labml.pt"
    torch.save(obj, path)
    loaded, cfg = load_labml_state_dict(path, CFG)
    assert cfg == CFG and not loaded.training
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_labml_unet_config_defaults_to_unit_data_range(tmp_path, model):
    path = tmp_path / "labml.pt"
    torch.save(model.state_dict(), path)
    _, cfg = load_labml_state_dict(path, CFG.unet)
    assert cfg.unet == CFG.unet and cfg.diffusion.data_range == (0.0, 1.0)


def test_labml_preset_name(tmp_path):
    torch.manual_seed(0)
    tiny = UNet(get_preset("tiny").unet)
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    loaded, cfg = load_labml_state_dict(path, "tiny")
    assert cfg == get_preset("tiny") and torch.equal(loaded.final.weight, tiny.final.weight)


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("final.bias"), r"missing key\(s\): final\.bias"),
    (lambda sd: sd.__setitem__("extra.w", torch.zeros(1)), r"unexpected key\(s\): extra\.w"),
    (lambda sd: sd.__setitem__("final.bias", torch.zeros(2)), r"final\.bias \(2,\) \(expected \(1,\)\)"),
    (lambda sd: sd.__setitem__("final.bias", torch.tensor([float("nan")])), "NaN or Inf"),
])
def test_labml_state_dict_errors(tmp_path, model, edit, match):
    sd = dict(model.state_dict())
    edit(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=match) as info:
        load_labml_state_dict(path, CFG)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("obj,match", [([1, 2, 3], "expected a state_dict"), ({}, "expected a state_dict"),
                                       ({"a": torch.zeros(1), "b": 3}, "non-tensor entries: b")])
def test_labml_not_a_state_dict(tmp_path, obj, match):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=match):
        load_labml_state_dict(path, CFG)


def test_labml_corrupt_and_truncated(tmp_path, model):
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        load_labml_state_dict(path, CFG)
    path.write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match=str(path)):
        load_labml_state_dict(path, CFG)
    with pytest.raises(FileNotFoundError):
        load_labml_state_dict(tmp_path / "none.pt", CFG)


class Payload:
    """Unpickling this calls open(marker, 'w'), creating the marker file: code execution made visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_hostile_pickle_is_never_executed(tmp_path, model, container):
    # First prove the payload works: a plain pickle.load does run it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof))).close()
    assert proof.exists()

    marker = tmp_path / "pwned"
    obj = {"model": model.state_dict(), "hook": Payload(marker)}
    path = tmp_path / "hostile.pt"
    if container == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(ValueError, match="refused") as info:
        load_labml_state_dict(path, CFG)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # Nor through the safetensors loader.
    with pytest.raises(ValueError):
        load_checkpoint(path)
    assert not marker.exists()


class BlockedPayload:
    """Unpickling this calls os.mkdir(marker): a global from a module torch blocks outright (posix)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_hostile_pickle_refusal_names_the_blocked_global(tmp_path, model):
    # torch 2.13 says "unsupported GLOBAL posix.mkdir whose module posix is blocked" (lower case), which
    # used to fall through to torch's first line: advice to retry with weights_only=False.
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    torch.save({"model": model.state_dict(), "hook": BlockedPayload(marker)}, path)
    with pytest.raises(ValueError, match="refused") as info:
        load_labml_state_dict(path, CFG)
    message = str(info.value)
    assert re.search(r"GLOBAL (posix|nt)\.mkdir", message) and "weights_only" not in message
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The shipped default
# --------------------------------------------------------------------------------------------
def test_default_checkpoint_path_is_valid_when_present():
    path = default_checkpoint_path()
    if path is None:
        pytest.skip("no shipped default model yet (ddpm_fast/assets/digits16.safetensors)")
    model, cfg = load_checkpoint(path)
    assert path.is_file() and cfg.unet == get_preset("digits16").unet and model.config == cfg.unet
