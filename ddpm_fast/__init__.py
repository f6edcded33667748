"""ddpm_fast: fast DDPM/DDIM sampling with a plain PyTorch reference (the labml UNet)."""
from .config import PRESETS, DiffusionConfig, ModelConfig, UNetConfig, get_preset
from .reference import Schedule, UNet

__version__ = "0.1.0"
__all__ = ["PRESETS", "DiffusionConfig", "ModelConfig", "UNetConfig", "get_preset", "Schedule", "UNet"]
