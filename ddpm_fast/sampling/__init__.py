"""Sampling: `sample()`, the reference loop, the fast loop (fused UNet + fused step + CUDA graph), the
kept graphs and the time table. The fast half (fast_loop, graphs, time_table) imports triton and the
C++ extension, so it is imported only when it is used."""
from .api import sample, sampler_coefficients
from .checks import (BACKENDS, DEFAULT_DDIM_STEPS, DEFAULT_VARIANT, OUTPUT_TYPES, SAMPLERS, check_model_output,
                     prepared)
from .reference_loop import reference_loop

__all__ = ["sample", "sampler_coefficients", "reference_loop", "check_model_output", "prepared", "BACKENDS",
           "DEFAULT_DDIM_STEPS", "DEFAULT_VARIANT", "OUTPUT_TYPES", "SAMPLERS"]
