"""Stage 2: the cross-attention U-Net, the diffusion process, samplers and the latent diffusion model."""
from ldm.controlnet import ControlNet
from ldm.diffusion import Diffusion, DiffusionConfig
from ldm.schedule import NoiseSchedule, ScheduleConfig
from ldm.unet import UNetModel

__all__ = ["ControlNet", "Diffusion", "DiffusionConfig", "NoiseSchedule", "ScheduleConfig", "UNetModel"]
