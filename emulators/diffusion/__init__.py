"""Diffusion (EDM) emulators: a halo-local U-Net-lite denoiser, EDM preconditioning and sampler,
checkpoints, and the `DiffusionEmulator` model (`kind: diffusion`)."""
from emulators.diffusion.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
from emulators.diffusion.edm import EDMConfig, Precond, edm_loss, heun_sample, sigma_schedule
from emulators.diffusion.emulator import DiffusionEmulator
from emulators.diffusion.network import NetworkConfig, UNetLite, receptive_halo

__all__ = ["CheckpointMismatch", "DiffusionEmulator", "EDMConfig", "NetworkConfig", "Precond", "UNetLite",
           "edm_loss", "heun_sample", "load_checkpoint", "receptive_halo", "save_checkpoint", "sigma_schedule"]
