"""The complete config schema with the official EncDiff values (configs/latent-diffusion/*-vq-4-16-encdiff.yaml).

Every config in configs/ starts from `get_base_config()` and changes values only: a field that is not
here is a typo, and `validate_config` says so. Where the paper and the official code disagree the
comment says so; the default is the official code's value.
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "procedural_shapes"
  config.seed = 23  # official main_val.py --seed default
  # Stages `experiments/train.py` runs, in order. Leave out "first_stage" to reuse a trained autoencoder from
  # first_stage.checkpoint (a workdir whose autoencoder/ holds a finished run).
  config.stages = ("first_stage", "diffusion")

  config.data = ml_collections.ConfigDict()
  config.data.name = "procedural_shapes"  # ground-truth dataset, see concept_diffusion.data.get_dataset
  config.data.image_size = 64  # paper: 64x64 for all datasets
  config.data.channels = 3
  config.data.tfds_data_dir = ""  # for TFDS-backed datasets (local path or gs://)
  config.data.manual_dir = ""  # for datasets read from the official download files

  # First stage: VQ-reg autoencoder, f=4 (configs/autoencoder/shapes3d_vq_4_16.yaml).
  fs = config.first_stage = ml_collections.ConfigDict()
  fs.kind = "vq"  # vq (official) | kl (DisDiff's *_kl_4_16 variant) | none (pixel-space diffusion, paper Table 6)
  fs.ch = 32
  fs.ch_mult = (1, 2, 4)  # two downsamplings: 64x64 -> 16x16
  fs.num_res_blocks = 2
  fs.attn_resolutions = ()  # the mid-block still has one self-attention block
  fs.dropout = 0.0
  fs.z_channels = 3
  fs.embed_dim = 3
  fs.n_embed = 2048  # VQ codebook size
  fs.beta = 0.25  # VQ commitment
  fs.vq_legacy = True  # taming's legacy loss (official): beta weighs the codebook term, not the commitment term
  fs.kl_weight = 1e-6  # kl variant only
  fs.norm_groups = 32
  fs.pixel_weight = 1.0  # L1
  fs.perceptual_weight = 1.0  # LPIPS; used only when fs.lpips_weights points at a local weights file
  fs.lpips_weights = ""
  fs.codebook_weight = 1.0
  fs.disc_start = 0  # step at which the GAN loss switches on (kl variant: 50001)
  fs.disc_weight = 0.75  # kl variant: 0.5
  fs.disc_factor = 1.0
  fs.disc_layers = 3
  fs.disc_ndf = 64
  fs.batch_size = 128
  # base_learning_rate 4.5e-6 x accumulate 2 x batch 128 (--scale_lr True) = 1.152e-3 on one GPU.
  fs.lr = 1.152e-3
  fs.b1 = 0.5
  fs.b2 = 0.9
  fs.num_steps = 20_000  # not specified anywhere (official issue #4); the [fork] used ~10-30 epochs
  fs.log_every = 100
  fs.checkpoint_every = 2_000
  fs.checkpoint = ""  # another run's workdir to take a finished first stage from (when "first_stage" not in stages)

  # Concept encoder: Encoder4 trunk + one MLP per scalar (openaimodel_enc.py).
  enc = config.encoder = ml_collections.ConfigDict()
  enc.num_tokens = 20  # latent_unit; paper App. H Table 12 ablates 5..30
  enc.token_dim = 16  # context_dim; paper text says 32 ("following DisDiff"), the code and the 42.3M count say 16
  enc.width = 128  # d
  enc.mlp_widths = (64, 128)
  enc.bn_momentum = 0.9  # PyTorch momentum 0.1
  enc.bn_eps = 1e-5

  unet = config.unet = ml_collections.ConfigDict()
  unet.model_channels = 64
  unet.channel_mult = (1, 2, 4, 4)
  unet.num_res_blocks = 2
  unet.attention_resolutions = (1, 2, 4)  # downsample rates with a SpatialTransformer
  unet.num_heads = 8
  unet.transformer_depth = 1
  unet.dropout = 0.0  # paper Table 9: 0.1; official config leaves the default 0
  unet.use_scale_shift_norm = True
  unet.resblock_updown = True
  unet.norm_groups = 32

  diff = config.diffusion = ml_collections.ConfigDict()
  diff.timesteps = 1000
  diff.beta_schedule = "linear"  # paper: cosine (Table 4 best); official config: LDM default linear
  diff.linear_start = 0.0015
  diff.linear_end = 0.0155
  diff.cosine_s = 8e-3
  diff.loss = "l1"  # paper Table 9: MSE (l2); official config: loss_type l1

  train = config.train = ml_collections.ConfigDict()
  train.batch_size = 128  # paper: 64; official config and the reproduction reports: 128
  train.lr = 2.56e-4  # paper: 1e-4; official: base 2e-6 x batch 128 (--scale_lr)
  train.warmup_steps = 10_000  # LambdaLinearScheduler, from 1e-6*lr to lr, then constant
  train.weight_decay = 0.01  # torch AdamW default
  train.ema_decay = 0.9999  # UNet only (paper: "all model parameters"; code: LitEma(self.model))
  train.scale_by_std = True  # scale_factor = 1/std(first batch latents)
  train.compute_dtype = "float32"  # float32 (official) | bfloat16 (TPU/GPU); parameters stay float32
  train.num_steps = 40_000  # ~10 epochs of 480k at bs 128: where [fork] saw Shapes3D metrics saturate
  train.log_every = 100
  train.checkpoint_every = 2_000
  train.figure_every = 10_000  # swap grid + reconstructions to W/figures and TensorBoard (official: every 10k)
  train.keep_checkpoints = 3

  ev = config.eval = ml_collections.ConfigDict()
  ev.every = 3_750  # diffusion steps between evaluations; official: every epoch (Shapes3D 480k/128); 0 = off
  ev.final = True  # evaluate the finished run with eval.metrics (written to W/eval/metrics_<step>.json)
  ev.metrics = ("beta_vae", "dci", "mig", "factor_vae")  # what EncDiff's main_val.py computes
  ev.train_metrics = ("factor_vae", "mig")  # the fast subset used during training (DCI's trees take minutes)
  ev.batch_size = 256  # images per encoder call when encoding the whole dataset
  ev.seed = 0  # disentanglement_lib's evaluation.random_seed

  sample = config.sample = ml_collections.ConfigDict()
  sample.ddim_steps = 200  # log_images / recon_metrics
  sample.eta = 1.0
  sample.num_images = 8
  return config
