"""Reference Flax linen models used by the experiments."""

from experiments.models.gpt import GPT, GPTConfig, bits_per_char, lm_loss
from experiments.models.unet import CrossAttention, ResBlock, UNet, UNetConfig, timestep_embedding

__all__ = [
    "GPT",
    "GPTConfig",
    "lm_loss",
    "bits_per_char",
    "UNet",
    "UNetConfig",
    "ResBlock",
    "CrossAttention",
    "timestep_embedding",
]
