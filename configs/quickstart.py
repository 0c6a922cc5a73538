"""Minutes on a laptop CPU: both stages on 32x32 procedural Shapes with small widths.

Same architecture and training recipe as the official config, scaled down: every change below is a size
(widths, depths, steps, batch) or a cadence, so the run exercises exactly the code paths of the full model.
"""
import ml_collections

from concept_diffusion import defaults


def get_config() -> ml_collections.ConfigDict:
  config = defaults.get_base_config()
  config.name = "quickstart"
  config.seed = 0
  config.data.image_size = 32

  fs = config.first_stage
  fs.ch = 32
  fs.ch_mult = (1, 2)  # f=2: 32x32x3 -> 16x16x3 latents (the official f=4 would leave a 3-pixel object at 8x8)
  fs.num_res_blocks = 1
  fs.n_embed = 512
  fs.norm_groups = 8
  fs.disc_ndf = 32
  fs.disc_layers = 2
  fs.disc_start = 400  # let the autoencoder fit before the GAN term switches on
  fs.batch_size = 32
  fs.num_steps = 800
  fs.log_every = 50
  fs.checkpoint_every = 400

  enc = config.encoder
  enc.width = 64

  unet = config.unet
  unet.model_channels = 32
  unet.channel_mult = (1, 2, 2)
  unet.num_res_blocks = 1
  unet.attention_resolutions = (1, 2, 4)
  unet.num_heads = 4
  unet.norm_groups = 8

  train = config.train
  train.batch_size = 32
  train.lr = 2.56e-4
  train.warmup_steps = 200
  train.num_steps = 3000
  train.log_every = 50
  train.checkpoint_every = 1000

  # Evaluation encodes all 480,000 images and fits DCI's trees: minutes more than the quickstart budget.
  # Run `python experiments/evaluate.py --workdir=runs/quickstart` afterwards.
  config.eval.every = 0
  config.eval.final = False
  config.sample.ddim_steps = 50
  config.sample.num_images = 8
  return config
