"""The labml reference UNet against REFERENCE_SPEC.md, with every expectation derived here,
independently of ddpm_fast/reference (no call into reference.functional for expected values)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import PRESETS, UNet, UNetConfig, get_preset
from ddpm_fast.reference.unet import AttentionBlock, ResidualBlock, TimeEmbedding
from tolerances import tol

LABML_CIFAR32_PARAMS = 167_777_987  # REFERENCE_SPEC.md, measured on labml's own code


# --------------------------------------------------------------------------------------------
# The state_dict the spec describes, written from the spec's prose (module names, shapes, order of
# levels) without reading unet.py: a labml state_dict has exactly these keys and shapes.
# --------------------------------------------------------------------------------------------
def spec_state_dict_shapes(cfg: UNetConfig) -> dict:
    n, E = cfg.n_channels, 4 * cfg.n_channels
    d_k = cfg.d_k
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def linear(name, fin, fout):
        shapes[f"{name}.weight"] = (fout, fin)
        shapes[f"{name}.bias"] = (fout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def residual(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        linear(f"{name}.time_emb", E, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.shortcut", cin, cout, 1)

    def attention(name, c):
        dk = c if d_k is None else d_k
        norm(f"{name}.norm", c)  # owned, never applied
        linear(f"{name}.projection", c, 3 * cfg.n_heads * dk)
        linear(f"{name}.output", cfg.n_heads * dk, c)

    conv("image_proj", cfg.image_channels, n, 3)
    linear("time_emb.lin1", E // 4, E)
    linear("time_emb.lin2", E, E)
    idx, c_in = 0, n
    levels = len(cfg.ch_mults)
    for i, mult in enumerate(cfg.ch_mults):
        c_out = c_in * mult  # multipliers compound
        for _ in range(cfg.n_blocks):
            residual(f"down.{idx}.res", c_in, c_out)
            if cfg.is_attn[i]:
                attention(f"down.{idx}.attn", c_out)
            c_in = c_out
            idx += 1
        if i < levels - 1:
            conv(f"down.{idx}.conv", c_in, c_in, 3)  # Downsample: 3x3 stride 2
            idx += 1
    residual("middle.res1", c_in, c_in)
    attention("middle.attn", c_in)
    residual("middle.res2", c_in, c_in)
    idx = 0
    for i in reversed(range(levels)):
        for _ in range(cfg.n_blocks):  # UpBlock(in, out=in): residual sees in + out channels
            residual(f"up.{idx}.res", c_in + c_in, c_in)
            if cfg.is_attn[i]:
                attention(f"up.{idx}.attn", c_in)
            idx += 1
        c_out = c_in // cfg.ch_mults[i]
        residual(f"up.{idx}.res", c_in + c_out, c_out)
        if cfg.is_attn[i]:
            attention(f"up.{idx}.attn", c_out)
        idx += 1
        c_in = c_out
        if i > 0:  # Upsample: ConvTranspose2d weight is [in, out, k, k]
            shapes[f"up.{idx}.conv.weight"] = (c_in, c_in, 4, 4)
            shapes[f"up.{idx}.conv.bias"] = (c_in,)
            idx += 1
    norm("norm", n)
    conv("final", n, cfg.image_channels, 3)
    return shapes


SMALL = UNetConfig(image_channels=3, n_channels=16, ch_mults=(1, 2, 2), is_attn=(False, True, True), n_blocks=2,
                   image_size=8, n_groups=4, n_heads=2, d_k=8)


def test_spec_derivation_reproduces_the_labml_parameter_count():
    # Checks the derivation above against labml's measured number, before it is used as the truth.
    shapes = spec_state_dict_shapes(get_preset("labml-cifar32").unet)
    assert sum(math.prod(s) for s in shapes.values()) == LABML_CIFAR32_PARAMS


@pytest.mark.parametrize("cfg", [SMALL, get_preset("tiny").unet, get_preset("digits16").unet],
                         ids=["small-2heads", "tiny", "digits16"])
def test_state_dict_names_and_shapes_match_the_spec(cfg):
    got = {k: tuple(v.shape) for k, v in UNet(cfg).state_dict().items()}
    want = spec_state_dict_shapes(cfg)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


def test_labml_style_state_dict_loads_strict_and_drives_the_forward():
    want = spec_state_dict_shapes(SMALL)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in want.items()}
    model = UNet(SMALL)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert model(x, torch.tensor([0, 999])).isfinite().all()


def test_residual_block_module_names():
    blk = ResidualBlock(16, 32, 64, n_groups=4)
    names = {n for n, _ in blk.named_children()}
    assert names == {"norm1", "conv1", "time_emb", "norm2", "conv2", "dropout", "shortcut", "act1", "act2",
                     "time_act"}
    assert isinstance(ResidualBlock(16, 16, 64, n_groups=4).shortcut, torch.nn.Identity)


# --------------------------------------------------------------------------------------------
# Shapes and parameter counts
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labml_cifar32():
    torch.manual_seed(0)
    return UNet(get_preset("labml-cifar32").unet).eval()


def test_labml_cifar32_parameter_count(labml_cifar32):
    assert sum(p.numel() for p in labml_cifar32.parameters()) == LABML_CIFAR32_PARAMS


def test_labml_cifar32_forward_shape(labml_cifar32):
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        y = labml_cifar32(x, torch.tensor([500]))
    assert y.shape == x.shape and y.dtype == torch.float32 and y.isfinite().all()


# Small presets run for real; the big ones propagate shapes on the meta device (no memory, no FLOPs;
# labml-cifar32 also runs one real forward above, and every preset runs the same module code).
@pytest.mark.parametrize("name,device", [(n, "meta" if PRESETS[n].unet.n_channels >= 64 else "cpu")
                                         for n in PRESETS], ids=list(PRESETS))
def test_preset_forward_shape(name, device):
    cfg = get_preset(name).unet
    with torch.device(device):
        model = UNet(cfg).eval()
        b = 3
        x = torch.randn(b, cfg.image_channels, cfg.image_size, cfg.image_size)
        t = torch.randint(0, 1000, (b,))
    assert sum(p.numel() for p in model.parameters()) == sum(
        math.prod(s) for s in spec_state_dict_shapes(cfg).values())
    with torch.inference_mode():
        y = model(x, t)
    assert y.shape == x.shape and y.device.type == device
    if device == "cpu":
        assert y.isfinite().all()


def test_cifar35m_is_about_35m_parameters():
    with torch.device("meta"):
        model = UNet(get_preset("cifar35m").unet)
    assert 30e6 < sum(p.numel() for p in model.parameters()) < 40e6


# --------------------------------------------------------------------------------------------
# UNetConfig's bounds: a checkpoint's config is untrusted input, so shapes no real DDPM has (whose
# tensor sizes overflow, or whose build takes minutes) are refused, naming the field
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,match", [
    (dict(n_channels=2 ** 17), r"n_channels \* product\(ch_mults\) = 524288 channels, at most 65536"),
    (dict(ch_mults=(1, 2, 2 ** 20)), r"n_channels \* product\(ch_mults\)"),
    (dict(ch_mults=(1,) * 9, is_attn=(False,) * 9, image_size=256), "ch_mults has 9 levels, at most 8"),
    (dict(n_blocks=65), "n_blocks must be <= 64"),
    (dict(image_size=8192), "image_size must be <= 4096"),
    (dict(image_channels=2 ** 17), "image_channels must be <= 65536"),
    (dict(n_heads=2 ** 14), r"n_heads \* d_k = 131072"),
    (dict(d_k=2 ** 17), r"n_heads \* d_k"),
    (dict(d_k=True), "d_k must be None or a positive int"),
    (dict(ch_mults=(1, 2.5, 2)), "ch_mults must be a list of ints"),  # int(2.5) used to make it 2
    (dict(ch_mults="122"), "ch_mults must be a list of ints"),
    (dict(is_attn=("no", "no", "no")), "is_attn must be a list of booleans"),  # bool("no") is True
    (dict(dropout="0.1"), "dropout must be in"),
])
def test_unet_config_bounds(changes, match):
    with pytest.raises(ValueError, match="UNetConfig: " + match):
        UNetConfig(**{**SMALL.to_dict(), **changes})


def test_presets_and_configs_at_the_bounds_are_accepted():
    # labml-cifar32's multipliers compound (64 * 1 * 2 * 2 * 4): 1024 channels, well inside the bound.
    assert get_preset("labml-cifar32").unet.level_channels() == (64, 128, 256, 1024)
    for name, preset in PRESETS.items():
        assert UNetConfig.from_dict(preset.unet.to_dict()) == preset.unet, name
    UNetConfig(image_channels=3, n_channels=2 ** 16, ch_mults=(1,), is_attn=(True,), n_blocks=64, image_size=4096)
    UNetConfig(n_channels=8, ch_mults=(1,) * 8, is_attn=(0, 1) * 4, image_size=4096, n_groups=8, n_heads=2 ** 13)
    np = pytest.importorskip("numpy")
    cfg = UNetConfig(ch_mults=np.array([1, 2, 2, 4]), is_attn=np.array([False, False, True, True]))
    assert cfg == UNetConfig() and hash(cfg) == hash(UNetConfig())


def test_non_square_input_keeps_its_shape():
    model = UNet(SMALL).eval()
    x = torch.randn(1, 3, 8, 12)
    with torch.inference_mode():
        assert model(x, torch.tensor([7])).shape == x.shape


@pytest.mark.parametrize("x_shape,t_shape,match", [
    ((2, 1, 8, 8), (2,), "shape"), ((2, 3, 6, 8), (2,), "divisible"), ((2, 3, 8, 8), (3,), "t of shape"),
])
def test_forward_rejects_bad_inputs(x_shape, t_shape, match):
    with pytest.raises(ValueError, match=match):
        UNet(SMALL)(torch.randn(x_shape), torch.zeros(t_shape, dtype=torch.long))


def test_forward_rejects_float_steps():
    with pytest.raises(ValueError, match="integer"):
        UNet(SMALL)(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))


# --------------------------------------------------------------------------------------------
# Blocks against closed forms written out here
# --------------------------------------------------------------------------------------------
def _randomise(module, scale=0.3, seed=0):
    # Non-default weights everywhere (GroupNorm's default 1/0 would hide a swapped weight and bias).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def _swish(x):
    return x / (1.0 + torch.exp(-x))


def _group_norm(x, groups, weight, bias, eps=1e-5):
    b, c, h, w = x.shape
    xg = x.reshape(b, groups, -1)
    mean = xg.mean(dim=-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as GroupNorm
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * weight[None, :, None, None] + bias[None, :, None, None]


@pytest.mark.parametrize("t", [[0, 1, 17, 511, 999], [500]], ids=["b5", "b1"])
@pytest.mark.parametrize("width", [128, 256, 512], ids=["E128", "E256", "E512"])
def test_time_embedding_closed_form(t, width):
    # nn.Linear's default init (random weights and biases, seeded by conftest): the tolerance is
    # stated for float32 rounding carried through an MLP of realistic gain.
    emb = TimeEmbedding(width).eval()
    half = width // 8
    rows = []
    for step in t:  # the sinusoid element by element, in Python floats (double precision)
        args = [step * math.exp(-i * math.log(10000.0) / (half - 1)) for i in range(half)]
        rows.append([math.sin(a) for a in args] + [math.cos(a) for a in args])
    s = torch.tensor(rows, dtype=torch.float64)
    w1, b1 = emb.lin1.weight.double(), emb.lin1.bias.double()
    w2, b2 = emb.lin2.weight.double(), emb.lin2.bias.double()
    want = _swish(s @ w1.T + b1) @ w2.T + b2
    got = emb(torch.tensor(t))
    assert got.shape == (len(t), width) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **tol("reference_closed_form_fp32", torch.float32))


@pytest.mark.parametrize("cin,cout", [(16, 32), (32, 32)], ids=["shortcut-conv", "identity"])
def test_residual_block_closed_form(cin, cout):
    time_c = 24
    blk = _randomise(ResidualBlock(cin, cout, time_c, n_groups=8, dropout=0.1)).double().eval()
    x = torch.randn(3, cin, 7, 9, dtype=torch.float64)
    t_emb = torch.randn(3, time_c, dtype=torch.float64)
    h = F.conv2d(_swish(_group_norm(x, 8, blk.norm1.weight, blk.norm1.bias)), blk.conv1.weight, blk.conv1.bias,
                 padding=1)
    h = h + (_swish(t_emb) @ blk.time_emb.weight.T + blk.time_emb.bias)[:, :, None, None]
    h = F.conv2d(_swish(_group_norm(h, 8, blk.norm2.weight, blk.norm2.bias)), blk.conv2.weight, blk.conv2.bias,
                 padding=1)
    skip = x if cin == cout else F.conv2d(x, blk.shortcut.weight, blk.shortcut.bias)
    torch.testing.assert_close(blk(x, t_emb), h + skip, **tol("reference_closed_form", torch.float64))


@pytest.mark.parametrize("c,heads,d_k", [(32, 1, None), (32, 2, 8), (96, 3, 16)], ids=["1head", "2heads", "C96"])
def test_attention_block_closed_form(c, heads, d_k):
    blk = _randomise(AttentionBlock(c, n_heads=heads, d_k=d_k, n_groups=8), scale=0.2).double().eval()
    dk = c if d_k is None else d_k
    x = torch.randn(3, c, 7, 9, dtype=torch.float64)
    b, n = 3, 7 * 9
    tokens = x.flatten(2).transpose(1, 2)                              # [B, N, C]
    qkv = tokens @ blk.projection.weight.T + blk.projection.bias       # [B, N, heads * 3 * d_k]
    qkv = qkv.reshape(b, n, heads, 3, dk)                              # per head: q | k | v, each d_k wide
    q, k, v = (qkv[:, :, :, j].permute(0, 2, 1, 3) for j in range(3))  # [B, heads, N, d_k]
    w = torch.exp((q @ k.transpose(-1, -2)) / math.sqrt(dk))
    w = w / w.sum(dim=-1, keepdim=True)                                # softmax over the keys
    res = (w @ v).permute(0, 2, 1, 3).reshape(b, n, heads * dk)
    out = res @ blk.output.weight.T + blk.output.bias + tokens
    want = out.transpose(1, 2).reshape(b, c, 7, 9)
    torch.testing.assert_close(blk(x), want, **tol("reference_closed_form", torch.float64))


def test_attention_groupnorm_is_really_unused():
    blk = _randomise(AttentionBlock(32, n_groups=8)).eval()
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    before = blk(x)
    with torch.no_grad():
        blk.norm.weight.fill_(float("nan"))
        blk.norm.bias.fill_(float("nan"))
    after = blk(x)
    assert torch.equal(before, after)
    after.square().sum().backward()
    assert blk.norm.weight.grad is None and blk.norm.bias.grad is None
    assert blk.projection.weight.grad is not None


def test_unet_attention_norms_get_no_gradient():
    # The quirk at model level: every AttentionBlock.norm is outside the graph (DDP would need
    # find_unused_parameters), every other parameter receives a gradient.
    model = UNet(SMALL)
    loss = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 900])).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        unused = ".attn.norm." in name
        assert (p.grad is None) == unused, name


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    model = UNet(get_preset("tiny").unet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()  # dropout 0.1 is live in training mode, as labml samples
    assert not torch.equal(model(x, t), model(x, t))
