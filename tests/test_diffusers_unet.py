"""The DDPM (diffusers) family: DDPMUNet and io.diffusers against diffusers itself (a test-only dependency).

A folder written by diffusers' own save_pretrained must load through load_checkpoint, give UNet2DModel's
output, and sample as diffusers' scheduler loop does with the same noise.
"""
import json

import pytest
import torch
from tolerances import tol

import ddpm_fast
from ddpm_fast.config import DDPMUNetConfig, DiffusionConfig, ModelConfig
from ddpm_fast.io import load_checkpoint, save_checkpoint
from ddpm_fast.io.diffusers import diffusion_config_from_diffusers, unet_config_from_diffusers
from ddpm_fast.reference import DDPMUNet, Schedule

diffusers = pytest.importorskip("diffusers")

# The three layouts of the issue: google/ddpm-cifar10-32's; the 256x256 family's (celebahq/church: six
# levels, attention at the fifth) at reduced width and size; one with heads (attention_head_dim) and a single
# ResNet per level, and every other option away from cifar10's (norm groups, eps, freq_shift, flip, padding).
CIFAR10 = dict(sample_size=32, block_out_channels=[128, 256, 256, 256],
               down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], layers_per_block=2,
               norm_num_groups=32, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
               attention_head_dim=None)
LAYOUT_256 = dict(CIFAR10, sample_size=64, block_out_channels=[32, 32, 64, 64, 128, 128],
                  down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
HEADS = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=[32, 64],
             down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"],
             layers_per_block=1, norm_num_groups=8, norm_eps=1e-5, freq_shift=0, flip_sin_to_cos=True,
             downsample_padding=1, attention_head_dim=8)
LAYOUTS = {"cifar10": CIFAR10, "layout256": LAYOUT_256, "heads": HEADS}


def _random_unet(cfg: dict, seed: int = 0, scale: float = 0.05):
    """A diffusers UNet2DModel with every parameter random (its init zeroes some, which would hide a
    misplaced tensor): weights N(0, scale^2), biases N(0, (4 scale)^2), norm gains 1 + N(0, (4 scale)^2)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn_like(p) * (scale if p.dim() > 1 else 4 * scale) + gain)
    return unet


def _save(tmp_path, unet, **sched):
    folder = tmp_path / "model"
    scheduler = diffusers.DDPMScheduler(**{"variance_type": "fixed_large", "clip_sample": True, **sched})
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_saved_folder_loads_and_matches_unet2dmodel(tmp_path, name):
    cfg = LAYOUTS[name]
    unet = _random_unet(cfg)
    model, config = load_checkpoint(_save(tmp_path, unet))
    assert isinstance(model, DDPMUNet) and config.architecture == "ddpm"
    s, c = cfg["sample_size"], cfg.get("in_channels", 3)
    x, t = torch.randn(2, c, s, s), torch.tensor([7, 999])
    with torch.no_grad():
        want, got = unet(x, t).sample, model(x, t)
    assert torch.isfinite(got).all() and want.abs().max() > 1e-2
    assert _rel_err(got, want) <= tol("diffusers_unet", torch.float32)["rtol"]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("name", ["cifar10", "heads"])
def test_twenty_steps_match_the_diffusers_loop(tmp_path, name, sampler):
    # diffusers' DDPMPipeline / DDIMPipeline loop, written out so that x_T and the noise come from the
    # generator sample(noise="generator") draws from in the same order (x_T, then one z per step).
    # conv_out scaled down: with all weights random, eps changes ~2.5x as fast as x does, and DDIM (no noise
    # to decorrelate) turns float32 rounding into chaos (a 1e-5 difference in eps doubled every step, to 6e-3
    # after 20: measured). A trained model's eps is far smoother; at a tenth of the output scale it is too.
    cfg = LAYOUTS[name]
    unet = _random_unet(cfg, seed=1)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    folder = _save(tmp_path, unet)
    cls = diffusers.DDPMScheduler if sampler == "ddpm" else diffusers.DDIMScheduler
    sched = cls.from_pretrained(folder, subfolder="scheduler")
    sched.set_timesteps(20)
    s, c = cfg["sample_size"], cfg.get("in_channels", 3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, c, s, s, generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
    want = (x.clamp(-1, 1) + 1) / 2
    got = ddpm_fast.sample(folder, batch_size=2, num_inference_steps=20, sampler=sampler, output_type="pt",
                           progress=False, device="cpu", noise="generator", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, **tol(f"diffusers_loop_{sampler}", torch.float32))


def test_round_trip_through_our_format_is_bit_identical(tmp_path):
    model, config = load_checkpoint(_save(tmp_path, _random_unet(HEADS)))
    path = save_checkpoint(tmp_path / "ours.safetensors", model, config)
    again, config2 = load_checkpoint(path)
    assert config2 == config and isinstance(again, DDPMUNet)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_unet_folder_alone_and_old_bin_weights_load(tmp_path):
    unet = _random_unet(HEADS)
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)  # diffusion_pytorch_model.bin
    model, config = load_checkpoint(tmp_path / "bin")
    assert config.diffusion.variant == "posterior" and config.diffusion.clip_x0  # DDPMScheduler's defaults
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert _rel_err(model(x, t), unet(x, t).sample) <= tol("diffusers_unet", torch.float32)["rtol"]


def test_flat_layout_loads_its_scheduler(tmp_path):
    # Some hub repositories keep config.json, the weights and scheduler_config.json side by side.
    unet = _random_unet(HEADS)
    unet.save_pretrained(tmp_path / "flat")
    diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False).save_pretrained(tmp_path / "flat")
    _, config = load_checkpoint(tmp_path / "flat")
    assert config.diffusion.variant == "paper" and not config.diffusion.clip_x0


def test_pre_0_15_attention_names_load(tmp_path):
    # Folders written before diffusers 0.15 name the attention weights query/key/value/proj_attn.
    from safetensors.torch import save_file

    folder = _save(tmp_path, _random_unet(HEADS))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in state.items():
        for new, was in old.items():
            k = k.replace(f".{new}.", f".{was}.") if ".attentions." in k else k
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(weights))
    model, _ = load_checkpoint(folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("sched", [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_end=0.012,
                                                                      beta_start=0.00085),
                                   dict(beta_schedule="squaredcos_cap_v2"), dict(num_train_timesteps=500)])
def test_beta_schedules_match_diffusers(sched):
    theirs = diffusers.DDPMScheduler(**sched)
    ours = Schedule(diffusion_config_from_diffusers({"_class_name": "DDPMScheduler", **theirs.config}))
    torch.testing.assert_close(ours.alpha_bar, theirs.alphas_cumprod, **tol("diffusers_schedule", torch.float32))


def test_trained_betas_are_used():
    betas = torch.linspace(1e-4, 0.03, 100).tolist()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=100, trained_betas=betas)
    ours = Schedule(diffusion_config_from_diffusers(dict(theirs.config)))
    torch.testing.assert_close(ours.alpha_bar, theirs.alphas_cumprod, **tol("diffusers_schedule", torch.float32))


def test_cli_samples_a_diffusers_folder(tmp_path, capsys):
    from ddpm_fast.cli import main

    folder = _save(tmp_path, _random_unet(HEADS))
    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(folder), "--steps", "4", "--num-images", "2", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert out.is_file() and "ddpm sampler" in capsys.readouterr().out


# --- hostile folders ------------------------------------------------------------------------------

def _folder(tmp_path, unet_cfg=None, sched=None, weights=None):
    """A hand-written diffusers folder: HEADS' config (updated by unet_cfg), weights of HEADS' network."""
    folder = _save(tmp_path, _random_unet(HEADS))
    if unet_cfg is not None:
        path = folder / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **unet_cfg}))
    if sched is not None:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **sched}))
    return folder


@pytest.mark.parametrize("change, message", [
    (dict(block_out_channels=[2 ** 20, 64]), r"block_out_channels must be in \[1, 65536\]"),
    (dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]), "unsupported down_block_types"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift = 'scale_shift' is not supported"),
    (dict(class_embed_type="timestep"), "class_embed_type = 'timestep' is not supported"),
    (dict(time_embedding_type="fourier"), "time_embedding_type = 'fourier' is not supported"),
    (dict(out_channels=2), "out_channels .* must equal in_channels"),
    (dict(some_new_option=3), "unknown UNet2DModel field 'some_new_option'"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DConditionModel' is not supported"),
    (dict(sample_size=[16, 32]), "sample_size must be an int"),
    (dict(layers_per_block=2), "missing key"),
])
def test_bad_unet_config_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_checkpoint(_folder(tmp_path, unet_cfg=change))


@pytest.mark.parametrize("change, message", [
    (dict(variance_type="learned_range"), "variance_type 'learned_range' is not supported"),
    (dict(prediction_type="v_prediction"), "prediction_type = 'v_prediction' is not supported"),
    (dict(beta_end=1.5), "beta_end"),
    (dict(num_train_timesteps=-5), "n_steps must be an int"),
    (dict(beta_schedule="sigmoid"), "beta_schedule must be one of"),
    (dict(clip_sample="yes"), "clip_sample must be true or false"),
    (dict(clip_sample_range=-1.0), "clip_range must be None or a number"),
    (dict(thresholding=True), "thresholding = True is not supported"),
    (dict(timestep_spacing="trailing"), "timestep_spacing = 'trailing' is not supported"),
    (dict(_class_name="EulerDiscreteScheduler"), "EulerDiscreteScheduler' is not supported"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas must be a list of n_steps=1000 numbers"),
])
def test_bad_scheduler_config_is_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as e:
        load_checkpoint(_folder(tmp_path, sched=change))
    assert "scheduler_config.json" in str(e.value) and "\n" not in str(e.value)


def test_missing_and_extra_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _folder(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"1 missing key\(s\): conv_out.bias; 1 unexpected key\(s\): extra.weight"):
        load_checkpoint(folder)


def test_pickle_payload_in_bin_is_refused_and_never_run(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HEADS))
    with open(folder / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"conv_in.weight": Payload()}, f)
    with pytest.raises(ValueError, match="refused to load: the pickle holds more than tensors"):
        load_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                           ("[" * 100 + "]" * 100, "nested 100 levels deep")])
def test_corrupt_config_json_is_refused(tmp_path, text, message):
    folder = _folder(tmp_path)
    (folder / "unet" / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(folder)


def test_config_conversions_keep_every_field():
    cfg = unet_config_from_diffusers(dict(HEADS, _class_name="UNet2DModel", _diffusers_version="0.42.1"))
    assert cfg == DDPMUNetConfig(**HEADS)
    assert ModelConfig.from_json(ModelConfig(cfg, DiffusionConfig(variant="paper")).to_json()).unet == cfg


def test_a_run_folder_with_a_config_json_stays_a_run_folder(tmp_path):
    # A training run folder is read as one even when a config.json happens to sit in it.
    model = DDPMUNet(DDPMUNetConfig(**HEADS))
    cfg = ModelConfig(model.config, DiffusionConfig())
    save_checkpoint(tmp_path / "model.safetensors", model, cfg)
    (tmp_path / "config.json").write_text("{not diffusers")
    loaded, config = load_checkpoint(tmp_path)
    assert config == cfg and isinstance(loaded, DDPMUNet)
