"""The fast path: one module per fused op, each registered as a torch.library op `ddpm_fast::<name>`
with a CPU kernel, a fake (meta) kernel and a CUDA kernel (Triton, or the C++/CUDA extension).

This namespace exports the same op names and signatures as `ddpm_fast.reference.functional`, so a
UNet runs on it by swapping `F` (see `fused`).
"""
