"""Stage 2: the cross-attention U-Net, the diffusion process, samplers, the latent diffusion model and the
`Pipeline` that draws images from a model file."""
from ldm.controlnet import ControlNet
from ldm.diffusion import Diffusion, DiffusionConfig
from ldm.pipeline import Pipeline
from ldm.png_metadata import save_image
from ldm.schedule import NoiseSchedule, ScheduleConfig
from ldm.unet import UNetModel

__all__ = ["ControlNet", "Diffusion", "DiffusionConfig", "NoiseSchedule", "Pipeline", "ScheduleConfig", "UNetModel",
           "save_image"]
