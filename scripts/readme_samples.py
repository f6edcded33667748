"""Write ddpm_fast/assets/digits16_samples.png, the README's picture of the shipped model's samples:
64 samples (DDIM, 50 steps, CPU generator seed 0, reference backend) as an 8x8 grid, shown 3x larger
with nearest-neighbour upscaling so the 16x16 digits stay sharp.

    python scripts/readme_samples.py [OUT]        (default: ddpm_fast/assets/digits16_samples.png)
"""
import sys

import torch
from PIL import Image

import ddpm_fast

out = sys.argv[1] if len(sys.argv) > 1 else "ddpm_fast/assets/digits16_samples.png"
images = ddpm_fast.sample(ddpm_fast.default_checkpoint_path(), batch_size=64, sampler="ddim",
                          num_inference_steps=50, generator=torch.Generator().manual_seed(0))
grid = ddpm_fast.make_grid(images)
ddpm_fast.save_image_atomic(grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST), out)
print(f"wrote {out}")
