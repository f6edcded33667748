"""The plain PyTorch reference: the labml UNet, the DDPM paper's UNet (diffusers' layout), the diffusion math,
and the op spec."""
from ..config import DDPMUNetConfig, UNetConfig
from . import functional
from .ddpm_unet import DDPMUNet
from .diffusion import Schedule, gather
from .unet import UNet

__all__ = ["functional", "Schedule", "gather", "UNet", "DDPMUNet", "build_unet"]


def build_unet(config):
    """The network a config describes: UNet for a UNetConfig, DDPMUNet for a DDPMUNetConfig."""
    if isinstance(config, UNetConfig):
        return UNet(config)
    if isinstance(config, DDPMUNetConfig):
        return DDPMUNet(config)
    raise TypeError(f"expected a UNetConfig or DDPMUNetConfig, got {type(config).__name__}")
