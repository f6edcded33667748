"""ddpm_fast.sample and the image helpers, on the tiny preset with a few steps."""
import sys
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import DiffusionConfig, ModelConfig, Schedule, UNet, get_preset, make_grid, sample, save_checkpoint
from ddpm_fast.io.images import image_format_for_path, save_image_atomic
from ddpm_fast.sampling import reference_loop
from tolerances import tol

TINY = get_preset("tiny")
STEPS = 3


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(TINY.unet).eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def run(model, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("generator", gen())
    kw.setdefault("progress", False)
    return sample(model, **kw)


# --------------------------------------------------------------------------------------------
# Output types
# --------------------------------------------------------------------------------------------
def test_output_pt(tiny):
    out = run(tiny, output_type="pt", batch_size=3)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    out.requires_grad_(True)  # an ordinary tensor, not an inference-mode one


def test_output_np_is_nhwc(tiny):
    pt = run(tiny, output_type="pt")
    arr = run(tiny, output_type="np")
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())


def test_output_pil_rgb_and_gray(tiny):
    pt = run(tiny, output_type="pt")
    ims = run(tiny, output_type="pil")
    assert isinstance(ims, list) and len(ims) == 2
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in ims)
    np.testing.assert_array_equal(np.asarray(ims[1]), (pt[1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    torch.manual_seed(1)
    gray = UNet(get_preset("digits16").unet)
    ims = run(gray, output_type="pil")
    assert all(im.mode == "L" and im.size == (16, 16) for im in ims)


def test_data_range_maps_to_unit_interval(tiny):
    # The same x_0 (same model, seed and schedule, no clipping) under data range [-1, 1] and [0, 1]
    # gives images clamp((x + 1) / 2) and clamp(x). A gentle 10-step schedule keeps x_0 near x_T ~ N(0, 1),
    # so both maps have pixels inside and outside their range.
    def images(lo):
        return run(tiny, output_type="pt", sampler="ddim",
                   config=ModelConfig(TINY.unet, DiffusionConfig(n_steps=10, data_range=(lo, 1.0))))

    a, b = images(-1.0), images(0.0)
    inside = (a > 0) & (a < 1)
    assert inside.float().mean() > 0.2 and (b == 0).any() and (b == 1).any()
    torch.testing.assert_close(b[inside], (2 * a - 1).clamp(0, 1)[inside], **tol("sampling_fp32", torch.float32))


# --------------------------------------------------------------------------------------------
# The loop against labml's own p_sample, and reproducibility
# --------------------------------------------------------------------------------------------
def test_full_ddpm_equals_labml_p_sample_loop(tiny):
    # A short schedule (T = 12) run at all its steps: the table-driven loop must reproduce labml's
    # p_sample applied step by step, with x_T and then one z per step from the same generator.
    cfg = ModelConfig(TINY.unet, DiffusionConfig(n_steps=12))
    got = run(tiny, output_type="pt", config=cfg, num_inference_steps=12, generator=gen(7))
    g = gen(7)
    sched = Schedule(cfg.diffusion)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        for t in reversed(range(12)):
            z = torch.randn(2, 3, 16, 16, generator=g)
            x = sched.p_sample(tiny, x, torch.full((2,), t, dtype=torch.long), z)
    torch.testing.assert_close(got, ((x + 1) / 2).clamp(0, 1), **tol("sampling_fp32", torch.float32))


def test_same_seed_same_images_different_seed_different(tiny):
    a = run(tiny, output_type="pt", generator=gen(5))
    b = run(tiny, output_type="pt", generator=gen(5))
    c = run(tiny, output_type="pt", generator=gen(6))
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_default_generator_follows_the_global_seed(tiny):
    torch.manual_seed(11)
    a = run(tiny, output_type="pt", generator=None)
    torch.manual_seed(11)
    b = run(tiny, output_type="pt", generator=None)
    c = run(tiny, output_type="pt", generator=None)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_explicit_cpu_device(tiny):
    assert torch.equal(run(tiny, output_type="pt", device="cpu"), run(tiny, output_type="pt", device=torch.device("cpu")))


@pytest.mark.gpu
def test_cpu_generator_gives_the_same_images_on_cuda():
    torch.manual_seed(0)
    model = UNet(TINY.unet).eval()
    cpu = run(model, output_type="pt", device="cpu", generator=gen(3))
    cuda = run(model, output_type="pt", device="cuda", generator=gen(3))
    torch.testing.assert_close(cuda, cpu, **tol("sampling_cpu_vs_cuda", torch.float32))
    model.to("cpu")


@pytest.mark.parametrize("sampler,extra", [("ddpm", {"variant": "paper"}), ("ddpm", {"variant": "posterior"}),
                                           ("ddpm", {"clip_x0": True}), ("ddim", {"eta": 0.0}),
                                           ("ddim", {"eta": 1.0, "clip_x0": True})])
def test_sampler_variants_run(tiny, sampler, extra):
    out = run(tiny, output_type="pt", sampler=sampler, **extra)
    assert out.shape == (2, 3, 16, 16) and out.isfinite().all()


def test_ddim_eta0_is_deterministic_given_x_T(tiny):
    sched = Schedule(TINY.diffusion)
    ts = sched.timesteps(4)
    x_T = torch.randn(2, 3, 16, 16)

    def loop(eta, seed):
        with torch.inference_mode():
            return reference_loop(tiny, x_T, ts, sched.ddim_coeffs(ts, eta), generator=gen(seed), progress=False)

    assert torch.equal(loop(0.0, 1), loop(0.0, 2))
    assert not torch.equal(loop(1.0, 1), loop(1.0, 2))  # with noise, the generator matters


def test_ddim_default_is_50_steps(tiny):
    calls = []
    handle = tiny.register_forward_pre_hook(lambda m, args: calls.append(args[1][0].item()))
    try:
        run(tiny, sampler="ddim", num_inference_steps=None, batch_size=1)
    finally:
        handle.remove()
    assert calls == Schedule(TINY.diffusion).timesteps(50).tolist()


def test_model_in_eval_during_sampling_and_flags_restored(tiny):
    model = UNet(TINY.unet)
    model.train()
    model.up[0].eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    seen = []
    handle = model.down[0].res.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_inference_mode_enabled())))
    try:
        run(model)
    finally:
        handle.remove()
    assert seen and all(not training and inference for training, inference in seen)
    assert {n: m.training for n, m in model.named_modules()} == before


def test_low_precision_model_keeps_fp32_state(tiny):
    dtypes = []
    handle = tiny.register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype))
    try:
        out = run(tiny, output_type="pt", dtype=torch.bfloat16)
    finally:
        handle.remove()
    # bf16 runs through a converted copy (hooks are copied too); the caller's model stays fp32.
    assert dtypes == [torch.bfloat16] * STEPS
    assert next(tiny.parameters()).dtype == torch.float32
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_sample_from_checkpoint_path(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, tiny, TINY)
    assert torch.equal(run(str(path), output_type="pt", device="cpu"), run(tiny, output_type="pt"))


def test_progress_bar_only_when_asked(tiny, capsys):
    run(tiny, progress=False)
    assert "sampling" not in capsys.readouterr().err
    run(tiny, progress=True)
    assert "sampling" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=2.0), "batch_size"),
    (dict(num_inference_steps=0), "num_inference_steps"), (dict(num_inference_steps=1001), "exceeds"),
    (dict(num_inference_steps=1.5), "num_inference_steps"),
    (dict(sampler="ddim", eta=-0.1), "eta"), (dict(sampler="ddim", eta=1.01), "eta"), (dict(sampler="ddim", eta="x"), "eta"),
    (dict(eta=0.5), "eta"), (dict(sampler="pndm"), "sampler"), (dict(variant="ddim"), "variant"),
    (dict(output_type="jpg"), "output_type"), (dict(backend="triton"), "backend"),
    (dict(generator=7), "generator"), (dict(dtype=torch.float64), "dtype"), (dict(dtype="fp8"), "dtype"),
    (dict(device="nonsense"), "device"), (dict(clip_x0="yes"), "clip_x0"),
    (dict(channels_last=True), "channels_last"),
    (dict(sampler="ddim", variant="paper"), "variant"), (dict(sampler="ddim", variant="posterior"), "variant"),
    (dict(device="mps"), "not supported"), (dict(device=""), "must not be empty"),
    (dict(image_size=13), "divisible"), (dict(image_size=(16, 0)), "image_size"),
    (dict(config=ModelConfig(get_preset("digits16").unet)), "image_channels"),
    (dict(config=TINY.unet), "ModelConfig"),
])
def test_bad_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        run(tiny, **kw)


def test_non_model_and_config_with_checkpoint(tiny, tmp_path):
    with pytest.raises(ValueError, match="nn.Module or a checkpoint"):
        sample(42)
    with pytest.raises(ValueError, match="UNetConfig"):
        sample(torch.nn.Conv2d(3, 3, 1), progress=False)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny, TINY)
    with pytest.raises(ValueError, match="config must be None"):
        sample(path, config=TINY)
    with pytest.raises(FileNotFoundError, match="missing"):
        sample(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a CUDA generator")
def test_cuda_generator_rejected(tiny):
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        run(tiny, generator=torch.Generator(device="cuda"))


@pytest.mark.parametrize("device", ["meta", "xpu"])
def test_unsupported_device_is_refused_before_the_model_moves(device):
    # device="meta" used to move the caller's weights to meta in place (their data gone) and then crash.
    model = UNet(TINY.unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not supported"):
        run(model, device=device)
    after = model.state_dict()
    assert all(v.device.type == "cpu" and torch.equal(v, before[k]) for k, v in after.items())


def test_model_on_meta_is_refused():
    with pytest.raises(ValueError, match="the model's device 'meta' is not supported"):
        run(UNet(TINY.unet).to("meta"))


@pytest.mark.gpu
def test_failed_run_moves_the_model_back():
    # sample() moves a module to `device` in place; when the run then fails, the module goes back.
    model = UNet(TINY.unet)

    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        run(model, device="cuda")
    handle.remove()
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_integer_likes_are_accepted(tiny):
    # numpy integers pass the int check and must reach Schedule.timesteps as plain ints.
    out = run(tiny, output_type="pt", batch_size=np.int64(2), num_inference_steps=np.int64(STEPS))
    assert torch.equal(out, run(tiny, output_type="pt"))
    assert make_grid(out, nrow=np.int64(1), padding=np.int32(0)).size == (16, 32)


class _ConstantEps(torch.nn.Module):
    """A stand-in model: eps = out(x), to test what sample() does with odd model outputs."""

    def __init__(self, out):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.out = out

    def forward(self, x, t):
        return self.out(x * self.scale)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_non_finite_x0_is_an_error_not_a_black_image(backend):
    nan = _ConstantEps(lambda x: torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        run(nan, config=TINY, backend=backend, output_type="pt")


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("out,match", [(lambda x: x[:, :1], r"shape \(2, 1, 16, 16\)"),
                                       (lambda x: x[:, :, :8], r"shape \(2, 3, 8, 16\)"),
                                       (lambda x: (x,), "got tuple"),
                                       (lambda x: x.to(torch.int64), "torch.int64")],
                         ids=["one-channel", "half-height", "tuple", "integer"])
def test_model_output_must_have_x_t_shape(backend, out, match):
    # A [B, 1, H, W] eps for 3-channel images used to be broadcast silently on the reference backend.
    with pytest.raises(ValueError, match=match):
        run(_ConstantEps(out), config=TINY, backend=backend)


def test_cuda_device_without_cuda(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(tiny, device="cuda")


def test_non_square_image_size(tiny):
    out = run(tiny, output_type="pt", image_size=(8, 24), batch_size=1)
    assert out.shape == (1, 3, 8, 24)


def test_fast_backend_missing_is_a_clear_error(tiny, monkeypatch):
    # A machine where the fast loop cannot be imported (no triton, a broken extension): None in
    # sys.modules makes the import raise ImportError, as a missing module would.
    monkeypatch.setitem(sys.modules, "ddpm_fast.sampling.fast_loop", None)
    with pytest.raises(RuntimeError, match="backend='fast' is not available"):
        run(tiny, backend="fast")
    assert run(tiny, output_type="pt").shape[0] == 2  # the reference backend still works


# --------------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,nrow,size", [(4, None, (38, 38)), (5, None, (56, 38)), (3, 1, (20, 56)),
                                         (3, 8, (56, 20)), (1, None, (20, 20))])
def test_make_grid_layout(n, nrow, size):
    imgs = torch.rand(n, 3, 16, 16)
    grid = make_grid(imgs, nrow=nrow)
    assert grid.mode == "RGB" and grid.size == size
    arr = np.asarray(grid)
    ncol = grid.size[0] // 18
    for k in range(n):  # every tile where torchvision's layout puts it, 2 px padding around each
        r, c = divmod(k, ncol)
        tile = arr[2 + 18 * r: 2 + 18 * r + 16, 2 + 18 * c: 2 + 18 * c + 16]
        np.testing.assert_array_equal(tile, (imgs[k].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert arr[:2].max() == 0 and arr[:, :2].max() == 0  # padding is black


def test_make_grid_inputs_agree_and_gray():
    imgs = torch.rand(4, 1, 8, 8)
    g_pt = make_grid(imgs)
    assert g_pt.mode == "L" and g_pt.size == (22, 22)
    pils = [Image.fromarray((imgs[i, 0] * 255).round().to(torch.uint8).numpy()) for i in range(4)]
    np.testing.assert_array_equal(np.asarray(make_grid(pils)), np.asarray(g_pt))
    np.testing.assert_array_equal(np.asarray(make_grid(imgs.permute(0, 2, 3, 1).numpy())), np.asarray(g_pt))


@pytest.mark.parametrize("bad", [[], torch.rand(3, 16, 16), torch.rand(2, 2, 8, 8), "images",
                                 [Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))]])
def test_make_grid_rejects(bad):
    with pytest.raises(ValueError):
        make_grid(bad)


@pytest.mark.parametrize("bad,match", [(torch.rand(2, 3, 4, 4).to_sparse(), "dense tensor, got a sparse_coo"),
                                       (torch.rand(2, 3, 4, 4, device="meta"), "CPU or CUDA tensor, got one on meta")],
                         ids=["sparse", "meta"])
def test_make_grid_rejects_sparse_and_meta_tensors(bad, match):
    # These used to fail inside clamp / the copy to the CPU with NotImplementedError.
    with pytest.raises(ValueError, match=match):
        make_grid(bad)


def test_make_grid_rejects_nrow():
    with pytest.raises(ValueError, match="nrow"):
        make_grid(torch.rand(2, 3, 4, 4), nrow=0)


def test_save_image_atomic_writes_png(tmp_path):
    im = make_grid(torch.rand(4, 3, 8, 8))
    path = save_image_atomic(im, tmp_path / "grid.png")
    assert os.listdir(tmp_path) == ["grid.png"]
    with Image.open(path) as back:
        assert back.format == "PNG"
        np.testing.assert_array_equal(np.asarray(back), np.asarray(im))
    save_image_atomic(Image.new("RGB", (3, 3)), path)  # replacing an existing file is fine
    with Image.open(path) as back:
        assert back.size == (3, 3)
    save_image_atomic(im, tmp_path / "grid.JPG")
    assert sorted(os.listdir(tmp_path)) == ["grid.JPG", "grid.png"]


@pytest.mark.parametrize("name,match", [("g.xyz", "unknown image extension"), ("g", "unknown image extension"),
                                        ("missing/g.png", "does not exist"), ("file.txt/g.png", "not a directory"),
                                        ("adir", "unknown image extension"), ("adir.png", "is a directory")])
def test_save_image_atomic_rejects(tmp_path, name, match):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.png").mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=match):
        save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("ext,mode", [(".h5", "RGB"), (".grib", "RGB"), (".wmf", "L"), (".xbm", "RGB"),
                                      (".msp", "L"), (".palm", "RGB"), (".blp", "RGB"), (".qoi", "L")])
def test_image_format_refuses_what_pil_cannot_write(tmp_path, ext, mode):
    # PIL registers these extensions but cannot write an image of `mode` in them: found out up front,
    # not after a whole sampling run.
    path = tmp_path / f"g{ext}"
    Image.init()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        pytest.skip(f"this Pillow has no saver registered for {ext}")
    assert image_format_for_path(path)  # the extension alone is known
    with pytest.raises(ValueError, match=f"cannot save {mode} images"):
        image_format_for_path(path, mode=mode)
    assert os.listdir(tmp_path) == []


def test_image_format_accepts_what_pil_can_write(tmp_path):
    assert image_format_for_path(tmp_path / "g.png", mode="L") == "PNG"
    if "QOI" in Image.SAVE:
        assert image_format_for_path(tmp_path / "g.qoi", mode="RGB") == "QOI"  # QOI has RGB, not grayscale
    assert image_format_for_path(tmp_path / "g.JPG", mode="RGB") == "JPEG"
    assert os.listdir(tmp_path) == []


def test_save_image_atomic_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    save_image_atomic(Image.new("RGB", (5, 5), "red"), path)
    old = path.read_bytes()

    def broken_save(self, fp, format=None, **kw):  # writes half a file, then dies
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ValueError, match="disk full"):
        save_image_atomic(Image.new("RGB", (5, 5), "blue"), path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["grid.png"]

    def interrupted_save(self, fp, format=None, **kw):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_image_atomic(Image.new("RGB", (5, 5), "blue"), path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["grid.png"]
