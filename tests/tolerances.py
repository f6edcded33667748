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
}


def tol(op: str, dtype: torch.dtype) -> dict:
    try:
        return dict(TOLERANCES[(op, dtype)])
    except KeyError:
        raise KeyError(f"no tolerance for ({op!r}, {dtype}) in tests/tolerances.py; add one with its reason") from None
