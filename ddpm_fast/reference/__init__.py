"""The plain PyTorch reference: the labml UNet, the diffusion math, and the op spec."""
from . import functional
from .diffusion import Schedule, gather
from .unet import UNet

__all__ = ["functional", "Schedule", "gather", "UNet"]
