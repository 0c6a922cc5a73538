"""Tiny everything: seconds on a CPU. Used by the tests."""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "smoke"
  config.seed = 0
  config.data.image_size = 16

  fs = config.first_stage
  fs.ch = 8
  fs.ch_mult = (1, 2)  # f=2: 16x16 -> 8x8
  fs.num_res_blocks = 1
  fs.n_embed = 64
  fs.norm_groups = 4
  fs.disc_layers = 2
  fs.disc_ndf = 8
  fs.batch_size = 4
  fs.num_steps = 3

  enc = config.encoder
  enc.num_tokens = 4
  enc.token_dim = 8
  enc.width = 16
  enc.mlp_widths = (8, 16)

  unet = config.unet
  unet.model_channels = 16
  unet.channel_mult = (1, 2)
  unet.num_res_blocks = 1
  unet.attention_resolutions = (1, 2)
  unet.num_heads = 2
  unet.norm_groups = 4

  config.diffusion.timesteps = 100
  train = config.train
  train.batch_size = 4
  train.warmup_steps = 2
  train.num_steps = 4
  train.log_every = 2
  train.checkpoint_every = 2

  config.eval.every = 0
  config.eval.final = False  # encoding all 480,000 images takes minutes; tests evaluate a tiny dataset instead
  config.train.figure_every = 0  # the final figures only
  config.sample.ddim_steps = 5
  config.sample.num_images = 4
  return config
