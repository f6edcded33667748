"""ddpm_fast: fast DDPM/DDIM sampling with a plain PyTorch reference (the labml UNet, and the DDPM paper's UNet
in diffusers' layout, so diffusers DDPM model folders load).

The rooms, lowest first (imports only point down this list):
  config, devices      frozen configs and presets; the device check and the dtype names
  reference/           the spec: functional ops, the labml UNet, the DDPM UNet, the diffusion schedule
  ops/                 the fast path's fused ops (Triton on CUDA, C++/reference on CPU)
  io/                  atomic writes, model checkpoints, diffusers model folders, images
  sampling/            sample(), the reference and fast loops, CUDA graphs, the time table
  training/            the training loop, its checkpoints, the run folder, datasets
  cli                  the `ddpm-fast` command (argparse lives only there)
"""
from .config import DDPM_PRESETS, PRESETS, DDPMUNetConfig, DiffusionConfig, ModelConfig, UNetConfig, get_preset
from .io.checkpoint import default_checkpoint_path, load_checkpoint, load_labml_state_dict, save_checkpoint
from .io.images import make_grid, save_image_atomic
from .reference import DDPMUNet, Schedule, UNet
from .sampling import sample
from .sampling.runs import sample_batches, sample_to_folder

__version__ = "0.1.0"
__all__ = ["PRESETS", "DDPM_PRESETS", "DiffusionConfig", "ModelConfig", "UNetConfig", "DDPMUNetConfig", "get_preset",
           "Schedule", "UNet", "DDPMUNet",
           "sample", "sample_to_folder", "sample_batches", "make_grid", "save_image_atomic", "save_checkpoint", "load_checkpoint",
           "load_labml_state_dict", "default_checkpoint_path", "train", "clear_graph_cache"]


def __getattr__(name):
    # `ddpm_fast.train` without importing the training stack (data loading, optimizers) at startup.
    if name == "train":
        from .training import train

        return train
    if name == "clear_graph_cache":  # the fast backend's kept CUDA graphs (imports triton: lazily)
        from .sampling.graphs import clear_graph_cache

        return clear_graph_cache
    raise AttributeError(f"module 'ddpm_fast' has no attribute {name!r}")
