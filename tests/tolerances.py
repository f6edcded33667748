"""Every comparison tolerance in the test suite, in one table.

Start from torch.testing.assert_close's defaults (fp32: rtol 1.3e-6, atol 1e-5; fp16: 1e-3, 1e-5;
bf16: 1.6e-2, 1e-5); every loosening carries its reason. Use `tol(op, dtype)` in tests:
    torch.testing.assert_close(out, ref, **tol("groupnorm_swish", torch.float16))
"""
import torch

# (op, dtype) -> dict(rtol=..., atol=...), with the reason beside each loosened entry.
TOLERANCES = {
    # reverse_step: pure elementwise FMAs on fp32 state; eps in low precision is upcast exactly.
    ("reverse_step", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("reverse_step", torch.float16): dict(rtol=1.3e-6, atol=1e-5),
    ("reverse_step", torch.bfloat16): dict(rtol=1.3e-6, atol=1e-5),
    # reverse_step_lowp_state: x_t itself kept in fp16/bf16. The fp32 update is rounded once to that dtype, and
    # in-kernel noise a few fp32 ulps off the reference's can flip that rounding: one ulp of the dtype
    # (assert_close's fp16/bf16 defaults).
    ("reverse_step_lowp_state", torch.float16): dict(rtol=1e-3, atol=1e-5),
    ("reverse_step_lowp_state", torch.bfloat16): dict(rtol=1.6e-2, atol=1e-5),
    # philox_normal: kernel z vs reference z. Identical Philox integers; log/sin/cos implementations differ by
    # <= ~2 ulp (|z| < 6), inside assert_close's fp32 defaults: nothing loosened.
    ("philox_normal", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # reference_closed_form: a reference block run in float64 against its formula written out in the
    # test (float64): assert_close's float64 defaults, nothing loosened.
    ("reference_closed_form", torch.float64): dict(rtol=1e-7, atol=1e-7),
    # reference_closed_form_fp32: float32 reference vs a float64 closed form of the time embedding (default
    # nn.Linear init): the sinusoid's argument t * freq reaches ~1e3 where a float32 ulp is 6e-5, so
    # sin/cos carry that error into the MLP (measured max 4.4e-6 at t = 999, E = 128..512): atol 2e-5.
    ("reference_closed_form_fp32", torch.float32): dict(rtol=1.3e-6, atol=2e-5),
    # schedule_fp32: the stored float32 schedule must be the float32 ROUNDING of the float64 values
    # (relative error <= 2^-24 = 5.96e-8), tighter than the fp32 default so that a schedule computed in
    # float32 (alpha_bar off by 3.6e-7 relative) fails. schedule_fp64: float64 masters, fp64 default.
    ("schedule_fp32", torch.float32): dict(rtol=6e-8, atol=0.0),
    ("schedule_fp64", torch.float64): dict(rtol=1e-7, atol=1e-7),
    # diffusion_fp32: a few float32 ops of the diffusion math against the same formula in float64.
    ("diffusion_fp32", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # coeffs_forms: one reverse step in two algebraic forms (eps form vs x0/posterior-mean form), or vs the
    # step written out in float64: float32 defaults hold (measured worst 5% of the allowance).
    ("coeffs_forms", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # sampling_fp32: whole sampling loops in float32 compared with each other (table-driven loop vs labml's
    # p_sample loop, images in [0, 1]): fp32 defaults hold (measured max 6e-7 over a 12-step loop).
    ("sampling_fp32", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # sampling_philox_backends: DDPM with noise="philox" on the reference backend (torch's log/sin/cos on the
    # Philox words) and the fast one (the kernel's own, <= ~2 ulp apart), images in [0, 1]: fp32 defaults
    # hold (measured max 7.5e-7 over 10 steps at batch 8, 2.4e-7 over DDPM-1000, digits16 on CPU).
    ("sampling_philox_backends", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # sampling_cpu_vs_cuda: the same CPU noise through the model on CPU and on CUDA (TF32 off); the convs
    # sum in different orders, a few steps amplify that: 2e-3 on [0, 1] images is half a 1/255 level.
    # Set before any GPU run; it held on the H100 (2026-11-26), where the test passed.
    ("sampling_cpu_vs_cuda", torch.float32): dict(rtol=0.0, atol=2e-3),
    # graph_vs_eager: the same fast sampling loop (25 steps, fp32) replayed from a CUDA graph and run
    # eagerly. Same kernels and inputs, but cuBLAS/cuDNN may pick other algorithms (other workspace)
    # under capture, so sums run in another order; the loop amplifies that. Measured on an H100:
    # 3.9e-5 abs near 0 and 2.4e-4 at |x| = 327 (an untrained model's DDIM x0 runs far out of [-1, 1]):
    # ~8 fp32 ulps there. A wrong step or noise is off by ~1e-1 of the image scale.
    ("graph_vs_eager", torch.float32): dict(rtol=1e-5, atol=2e-4),
    # fast_loop_fp32: the fast loop on CPU (C++ step; fused ops, time table and NHWC where a test asks)
    # against the reference loop with the same injected noise, 5-20 steps: the table and residual_add
    # sum the time projection and biases in another order and NHWC convs run other oneDNN algorithms;
    # an untrained model's x reaches |x| ~ 400, where fp32 ulps are 3e-5. Measured max 1.5e-4 abs
    # (fused NHWC); a wrong step or noise is off by ~1e-1 of the image scale.
    ("fast_loop_fp32", torch.float32): dict(rtol=1e-4, atol=1e-4),
    # fused_unet_cpu: a fused UNet forward on CPU vs the reference (the ops' CPU kernels are the reference
    # math): fp32 defaults, nothing loosened.
    ("fused_unet_cpu", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # dynamo_eager: torch.compile with an eager backend (the traced ops replayed) vs the model itself, on
    # CPU and CUDA: the same kernels, though cuBLAS may pick other algorithms in the traced graph (on CPU
    # the outputs are identical). Set before the first H100 run, where it held (2026-11-26).
    ("dynamo_eager", torch.float32): dict(rtol=1e-4, atol=1e-4),
    # layout_fp32: the same fast loop (10 DDPM steps, fp32, batch 101) with the UNet in NHWC vs NCHW
    # on the CPU: oneDNN runs other conv algorithms per layout, so sums are ordered differently;
    # measured max 1.0e-4 abs (images ~[-3, 3]). A layout bug (a permuted channel) is off by ~1.
    ("layout_fp32", torch.float32): dict(rtol=1e-4, atol=5e-4),
    # attention (fused block / flash core vs the reference in float64 on the same inputs, outputs of
    # magnitude up to ~10 with peaked softmaxes). fp32: GEMMs and softmax reduce over up to 1024 terms
    # in another order (measured max 3.6e-6, as the fp32 reference's own error). fp16/bf16: qkv, P and
    # the output are rounded to the dtype, so a few units of its precision: measured max 4.5e-3 (fp16)
    # and 6.3e-2 (bf16, one ulp at 8..16; the CPU interpreter truncates to bf16), against 7.8e-3 and
    # 6.3e-2 for the reference itself run in fp16/bf16; atol doubled for the GPU grid's larger tails.
    # H100 (first run): labml-cifar32's block (C = d = 1024, batch 64) reached 2.1e-5 on outputs up to
    # ~10 (1024-term fp32 sums in the kernel's tile order vs float64): fp32 atol raised to 5e-5.
    ("attention", torch.float32): dict(rtol=1e-5, atol=5e-5),
    ("attention", torch.float16): dict(rtol=5e-3, atol=1e-2),
    ("attention", torch.bfloat16): dict(rtol=4e-2, atol=8e-2),
    # groupnorm_swish (fused kernel vs the reference in the same dtype): fp32 statistics in another
    # summation order still meet the fp32 defaults. In fp16/bf16 the reference rounds the normalised
    # value, the sigmoid and their product to the dtype (3 roundings, ~2 units in the last place apart
    # from the kernel's single rounding of an fp32 result). Measured worst need (CPU interpreter, 7 preset
    # and odd shapes x add/swish): fp16 rtol 1.2e-3 at atol 1e-4; bf16 rtol 9e-3 at atol 1e-3 (outputs
    # near 0, where the reference's intermediate roundings act as an absolute error).
    ("groupnorm_swish", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("groupnorm_swish", torch.float16): dict(rtol=3e-3, atol=1e-4),
    ("groupnorm_swish", torch.bfloat16): dict(rtol=1.6e-2, atol=2e-3),
    # groupnorm_swish_truth (fused kernel vs the spec computed in float64 from the same inputs, with the
    # add rounded to x's dtype as the spec does, then rounded once to x's dtype). The kernel works in
    # fp32 and rounds once, so it may sit one unit in the last place of the dtype away where its fp32
    # value and the truth straddle a rounding boundary: rtol = one ulp relative (fp16 2^-10, bf16 2^-7),
    # atol for outputs near 0 (fp32 noise of the O(1) normalised value). The first H100 run showed the
    # same-dtype comparison above fails on CUDA (its group_norm rounds the normalised value, its
    # sigmoid and the product separately: up to ~2 ulps off, e.g. 0.023 at |y| ~ 3 in bf16), so the
    # kernel tests compare with this truth instead.
    ("groupnorm_swish_truth", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("groupnorm_swish_truth", torch.float16): dict(rtol=1e-3, atol=1e-5),
    ("groupnorm_swish_truth", torch.bfloat16): dict(rtol=8e-3, atol=1e-5),
    # residual_add_truth (fused kernel vs x + bias + residual + residual_bias summed in float64 and rounded
    # once to x's dtype): the kernel sums in fp32 and rounds once, so it can sit one unit in the last place
    # away where its fp32 sum and the truth straddle a rounding boundary: one ulp relative (fp16 2^-10,
    # bf16 2^-7); fp32: three fp32 roundings of terms up to ~10 stay inside the defaults.
    ("residual_add_truth", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("residual_add_truth", torch.float16): dict(rtol=1e-3, atol=1e-5),
    ("residual_add_truth", torch.bfloat16): dict(rtol=8e-3, atol=1e-5),
    # residual_add (fused kernel vs the reference in the same dtype): the reference rounds after each of
    # its three adds, each off by up to half an ulp of the running sum, which for these inputs reaches
    # 8..16 while the output may be near 0 (cancellation): absolute error up to one ulp at 8..16 (fp16
    # 7.8e-3, bf16 6.25e-2; measured exactly those over 20 random draws), so atol is set there.
    ("residual_add", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("residual_add", torch.float16): dict(rtol=1e-3, atol=1e-2),
    ("residual_add", torch.bfloat16): dict(rtol=1.6e-2, atol=8e-2),
    # conv2d_truth (Triton implicit-GEMM conv vs F.conv2d in float64 on the same inputs, rounded once to the
    # dtype; outputs ~N(0, 1)). fp32: K = C_in * 9 products summed in fp32 in another order: measured max
    # 8.3e-7 at K <= 864 on CPU; the presets reach K = 18432 (labml-cifar32's 2048-channel convs), where
    # rounding error grows ~sqrt(K), ~4.6x: atol 2e-5. fp16/bf16: fp32 accumulation rounded once, so one
    # ulp of the dtype at most (measured 4.9e-4 abs fp16, 5.2e-3 relative bf16), as residual_add_truth.
    ("conv2d_truth", torch.float32): dict(rtol=1.3e-6, atol=2e-5),
    ("conv2d_truth", torch.float16): dict(rtol=1e-3, atol=1e-5),
    ("conv2d_truth", torch.bfloat16): dict(rtol=8e-3, atol=1e-5),
    # conv2d (Triton kernel vs CPU F.conv2d in the same dtype): oneDNN sums in its own order and, in
    # fp16/bf16, its own blocking; measured max 1.6e-6 (fp32), 9.8e-4 (fp16, 2 ulps at ~1), 3.9e-3 (bf16,
    # 7.5e-3 relative): two ulps of the dtype.
    ("conv2d", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("conv2d", torch.float16): dict(rtol=2e-3, atol=1e-4),
    ("conv2d", torch.bfloat16): dict(rtol=1.6e-2, atol=1e-3),
    # conv_transpose2d: the conv2d kernel's arithmetic on four 2x2 sub-convolutions (K = 4 C_in <= 1024 at the
    # presets): the conv2d entries and reasons hold (measured max 6.2e-7 fp32, 1.4e-2 bf16 at outputs ~2-4),
    # except against CPU's own fp16 transposed conv, which accumulates in fp16: 4.2e-3 from the float64
    # truth at outputs ~1-3 (measured over 30 draws), so fp16 atol 5e-3 there.
    ("conv_transpose2d_truth", torch.float32): dict(rtol=1.3e-6, atol=2e-5),
    ("conv_transpose2d_truth", torch.float16): dict(rtol=1e-3, atol=1e-5),
    ("conv_transpose2d_truth", torch.bfloat16): dict(rtol=8e-3, atol=1e-5),
    ("conv_transpose2d", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("conv_transpose2d", torch.float16): dict(rtol=2e-3, atol=5e-3),
    ("conv_transpose2d", torch.bfloat16): dict(rtol=1.6e-2, atol=1e-3),
    # upsample_conv2d (fold + the conv_transpose2d kernel vs the spec in float64 on the same inputs): the
    # conv_transpose2d_truth reasons, plus one rounding of each folded tap (a sum of up to four 3x3 taps) to
    # the weights' dtype for fp16/bf16, a relative weight error of up to half an ulp.
    ("upsample_conv2d", torch.float32): dict(rtol=1.3e-6, atol=2e-5),
    ("upsample_conv2d", torch.float16): dict(rtol=2e-3, atol=1e-3),
    ("upsample_conv2d", torch.bfloat16): dict(rtol=1.6e-2, atol=8e-3),
    # time_embedding (fused kernel vs the reference in the same dtype). fp32: the sinusoid's arguments
    # t * f reach ~1e3 rad, where one fp32 ulp is 6e-5 rad. The kernel's exp (numpy's in the interpreter,
    # ex2.approx on the GPU: ~2 ulps) gives frequencies 1-2 ulps off torch's, which moves t * f, hence a
    # sin/cos entry, by up to ~1e-4 (sin/cos themselves are libdevice-accurate on the GPU); both Linears
    # pass that on (measured on CPU: 8e-6): atol 1e-4. A wrong frequency, order or bias is off by ~1e-1.
    ("time_embedding", torch.float32): dict(rtol=1.3e-6, atol=1e-4),
    # fp16/bf16: the reference rounds lin1's output, the sigmoid and the Swish product to the dtype, the
    # kernel rounds the fp32 Swish once; each is ~1 ulp from fp64, so they differ by up to 2 ulps of an
    # output below 1 (fp16 4.9e-4, bf16 3.9e-3 per ulp at 0.5..1; measured 3.7e-4 and 2.4e-3).
    ("time_embedding", torch.float16): dict(rtol=1e-3, atol=5e-4),
    ("time_embedding", torch.bfloat16): dict(rtol=1.6e-2, atol=4e-3),
    # time_table (table rows vs the computed projections of the same model): the table is computed in
    # fp64 from fp32 embeddings and rounded once, so fp32/fp64 meet the defaults. In fp16/bf16 the
    # computed path rounds the embedding, the Swish and each projection to the dtype: ~2 ulps apart
    # at |y| < 0.25 (measured fp16 1.2e-4, bf16 9.8e-4).
    ("time_table", torch.float64): dict(rtol=1e-7, atol=1e-7),
    ("time_table", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    ("time_table", torch.float16): dict(rtol=1e-3, atol=3e-4),
    ("time_table", torch.bfloat16): dict(rtol=1.6e-2, atol=2e-3),
    # time_table_unet: a whole tiny UNet forward with the table vs with the computed time path (fp32):
    # ~1e-8 differences in the projections pass through the net; the fp32 defaults hold (measured 1.2e-6).
    ("time_table_unet", torch.float32): dict(rtol=1.3e-6, atol=1e-5),
    # diffusers_unet: DDPMUNet vs diffusers' UNet2DModel on the same weights and inputs, fp32 on CPU (the
    # issue's bar: rel 1e-5). The convs' bias is added in another pass and the time projection in another
    # order (labml's fusion points), and diffusers runs attention through SDPA: measured max relative
    # error (norm of the difference over the norm of the output) 1.6e-6 for cifar10-32's layout.
    ("diffusers_unet", torch.float32): dict(rtol=1e-5, atol=0.0),
    # diffusers_loop_ddpm / _ddim: 20-step loops of sample() against diffusers' scheduler loop with the same
    # x_T and noise, images in [0, 1]. Each forward differs by ~1e-6 relative (diffusers_unet). DDPM: measured
    # max 1.7e-5 on cifar10-32's layout (35.7M parameters); atol 5e-5 is 1/80 of an 8-bit level. DDIM (eta 0)
    # is deterministic and scales x up from noise to data: a difference made at t = 950 is multiplied by
    # sqrt(alpha_bar_prev / alpha_bar_t) at every later step, up to 1 / sqrt(alpha_bar_950) ~ 90 in all, so
    # the first step's 1.5e-6 ends near 1e-4: measured max 8.5e-5; atol 2e-4 (1/20 of a level). A wrong
    # coefficient, clip or noise draw is off by ~1e-1.
    ("diffusers_loop_ddpm", torch.float32): dict(rtol=0.0, atol=5e-5),
    ("diffusers_loop_ddim", torch.float32): dict(rtol=0.0, atol=2e-4),
    # diffusers_schedule: alphas_cumprod of each beta schedule against diffusers', which computes betas and
    # their cumulative product in float32 (ours: float64, then rounded): a few float32 ulps after 1000
    # products, measured max 6e-7 relative.
    ("diffusers_schedule", torch.float32): dict(rtol=5e-6, atol=1e-9),
    # ddpm_graph_vs_reference: the graphed fast sampler on the cifar10-32 network (CUDA, 10 DDIM steps, batch
    # 8, images in [0, 1]) against the reference backend on CUDA with the same Philox noise. fp32: other
    # kernels sum in other orders, as sampling_cpu_vs_cuda (2e-3, half an 8-bit level). bf16: both run the
    # model in bf16 (8 bits of mantissa), and DDIM carries the differences along: 4e-2 (10 levels), set
    # before any GPU run; a broken op is off by far more (~0.3).
    ("ddpm_graph_vs_reference", torch.float32): dict(rtol=0.0, atol=2e-3),
    ("ddpm_graph_vs_reference", torch.bfloat16): dict(rtol=0.0, atol=4e-2),
}


def tol(op: str, dtype: torch.dtype) -> dict:
    try:
        return dict(TOLERANCES[(op, dtype)])
    except KeyError:
        raise KeyError(f"no tolerance for ({op!r}, {dtype}) in tests/tolerances.py; add one with its reason") from None


# Deep compositions (whole UNet forward, many sampling steps), DESIGN.md's relative rule:
#     rel_err(fast, ref_fp64) <= 2 * rel_err(ref_same_dtype, ref_fp64) + DEEP_FLOOR[dtype]
# The floor covers the case where the reference in that dtype happens to be nearly exact (fp32 on a
# small model can land ~1e-7 from fp64) while the fused kernels reorder sums: a few hundred fp32
# roundings accumulate to ~1e-6; fp16/bf16 floors are a small fraction of one unit of their precision.
DEEP_FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b: the float64 truth)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def assert_deep(out: torch.Tensor, ref_same_dtype: torch.Tensor, truth64: torch.Tensor, dtype: torch.dtype,
                what: str = "fast") -> tuple:
    """The deep-composition rule above; returns (err_out, err_ref) for reporting."""
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err_out, err_ref = rel_err(out, truth64), rel_err(ref_same_dtype, truth64)
    assert err_out <= 2 * err_ref + DEEP_FLOOR[dtype], \
        f"{what}: rel err {err_out:.3g} vs the same-dtype reference's {err_ref:.3g} ({dtype})"
    return err_out, err_ref


def assert_deep_forward(model, fast_model, x, t, dtype, what: str = "fast UNet") -> tuple:
    """assert_deep on one forward: `fast_model` in `dtype` against `model` (the reference, same weights) run in
    float64 (the truth) and then converted to `dtype` (the same-dtype reference). Leaves `model` in `dtype`."""
    with torch.no_grad():
        truth = model.double()(x.double(), t).float()
        model.to(dtype)
        same = model(x.to(dtype), t).float()
        out = fast_model(x.to(dtype), t).float()
    return assert_deep(out, same, truth, dtype, what)
