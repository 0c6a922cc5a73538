"""EncDiff sized for a 2-core CPU: 71-105 min of training per 2,400-step run on 32x32 procedural Shapes (RESULTS.md).

  python experiments/train.py --config=configs/repro_cpu.py --workdir=runs/repro/encdiff_seed0 --config.seed=0

The same model and objective as the paper (Encoder4 -> N scalars -> per-scalar MLP tokens -> cross-attention in
every transformer of a UNet, plain noise-prediction loss, nothing else), scaled to what two cores can train, with
one departure: training timesteps are drawn around mid noise instead of uniformly (below).
On a CPU, images per second bounds everything, so each choice below buys images/s or learning per image.
Measured throughput and the reasons are in RESULTS.md. Ablations (paper Tables 3, 12):
  --config.encoder.num_tokens=5 | 10      (20 is this config)
  --config.unet.conditioning=adagn        (tokens through the ResBlocks' norms instead of cross-attention)
  --config.diffusion.timestep_sampling=uniform   (the paper's and official timestep sampling)
experiments/reproduce.py runs them all.
"""
import ml_collections

from concept_diffusion.config import get_base_config


def get_config() -> ml_collections.ConfigDict:
  config = get_base_config()
  config.name = "repro_cpu"
  config.seed = 0

  # 32x32: a quarter of the pixels of 64x64 for every layer and the renderer, and the object (3-15% of the image)
  # is still 30-150 pixels. The metrics only need the factors to be visible, not fine texture.
  config.data.image_size = 32

  # Pixel space (paper Table 6: pixel-space EncDiff scores at least as well as latent). A VQ first stage would
  # cost a share of the 2 hours allowed per run for its own training and squeezes the small object into a few
  # latent cells.
  config.stages = ("diffusion",)
  config.first_stage.kind = "none"

  enc = config.encoder
  enc.num_tokens = 20  # the paper's N for every dataset (Table 12 ablates 5..30)
  enc.token_dim = 16  # official context_dim
  # Half the official width: the encoder is a small share of a training step, but every evaluation encodes all
  # 480,000 images with it, and at width 128 that pass alone takes minutes on two cores.
  enc.width = 64

  unet = config.unet
  # The official layout (ResBlocks with scale-shift norm and resblock up/down, transformers with self- and
  # cross-attention, zero-init outputs) at CPU size: three levels at 32, 16 and 8 pixels with 16, 32 and 64
  # channels and one ResBlock each. Compute is set by the full-resolution level, so it gets the fewest channels:
  # 1.1M parameters, 1.0 GFLOP per image for forward + backward (XLA's count). 32 base channels with (1, 2, 2)
  # would be 1.9M parameters and 2.4 GFLOP (measured 2.7x slower), 64 base channels 7.5M: too slow for 2 hours.
  unet.model_channels = 16
  unet.channel_mult = (1, 2, 4)
  unet.num_res_blocks = 1
  # Transformers at 16x16 and 8x8 and in the middle block (also 8x8: the levels are 32, 16 and 8 pixels), as the
  # official model attends at 1/4..1/16 of the image.
  # Self-attention over the 1,024 queries of 32x32 would cost more than all convolutions there, so the
  # full-resolution level has none (cross-attention maps are drawn at 16x16).
  unet.attention_resolutions = (2, 4)
  unet.num_heads = 4  # head dims 8 and 16 (official 8..32)
  unet.norm_groups = 8  # 2 channels per group at the first level, as the official 64 channels / 32 groups

  diff = config.diffusion
  # The paper's choices (Tables 4 and 9), which it reports best for disentanglement; a short-run check of
  # pixel-space EncDiff with them reached FactorVAE 0.85 / DCI 0.48 in 35 minutes on this machine.
  diff.beta_schedule = "cosine"
  diff.loss = "l2"
  # Not the paper's uniform t (official; `ablation_uniform_t` in experiments/reproduce.py): t/T = sigmoid(N(0, 1))
  # puts 73% of the updates in the middle half of the noise levels, where the tokens can change the prediction.
  # Measured at 76,800 images (RESULTS.md, the 2026-12-01 runs, seed 0): FactorVAE 0.673 vs 0.546, DCI 0.299 vs 0.177, and
  # the UNet relies on the tokens 2-3x more at the same images seen; chosen after seeing these two seed-0 runs'
  # metrics. Uniform t spends most updates at low t, where the eps loss is dominated by fine noise the tokens cannot
  # predict; the official runs can afford that over 4.8M images.
  diff.timestep_sampling = "logit_normal"

  train = config.train
  # Small batches: for a fixed number of images, more updates learn faster early on, and on 2 cores a batch of 64
  # is no faster per image than 32 (measured: 18.6 vs 18.8 images per CPU-second).
  train.batch_size = 32
  # The earlier check's value, a little above the official 2.56e-4 (at a 4x larger batch): with this few steps,
  # speed matters more than the last bit of stability. AdamW with weight decay 0.01 as official.
  train.lr = 3e-4
  # Official 10,000 would be the whole run. 100, not 500: measured (2026-12-01), this UNet's loss was still 0.55 at
  # step 300 of a 500-step warm-up (the zero-initialised output convolutions grow at the learning rate), and the
  # tokens had no measurable effect on the loss yet; the warm-up only slowed the start of a 2,400-step run.
  train.warmup_steps = 100
  # The EMA UNet only draws the figures (the encoder is evaluated raw, as official). 0.9999 needs ~10^4+ steps
  # to forget the initialisation; 0.999 averages over the last ~1,000 steps.
  train.ema_decay = 0.999
  # 76,800 images: measured 16.5 img/s for each of two runs pinned one per core (`experiments/reproduce.py
  # --parallel=2`), so ~78 min of training + 3 evaluations (~5 min each on one core) ≈ 1.6 h of one core (recorded:
  # 71-105 min of training; the final evaluation's DCI alone took 6-14 min). Two runs were planned to finish within
  # one ~2 h sitting, which matters where run directories do not outlive the sitting (the development VM;
  # RESULTS.md). train.num_steps may be raised on the same workdir to extend a finished run; 4,000 steps (128,000
  # images) took 79-80 min of training per run on the VM of 2026-12-02 (two seeds, run after seeing the 2,400-step
  # scores still rising: FactorVAE 0.846 / 0.764, DCI 0.405 / 0.396; RESULTS.md).
  train.num_steps = 2_400
  train.log_every = 100
  train.checkpoint_every = 500  # a preempted run loses at most ~15 min
  train.figure_every = 0  # figures at the end only: sampling is slow on a CPU

  ev = config.eval
  # Three evaluations per run (800, 1,600, 2,400 = the final one) for the metric-vs-time curves, at the same
  # steps as the first (4,000-step) encdiff_seed0 run's. Each renders and encodes all 480,000 images (~5 min on
  # one core); that time is not in the curves' wall clock (metrics.jsonl "wall_s" counts training only).
  ev.every = 800
  ev.train_metrics = ("factor_vae", "mig")  # DCI's 5,700 boosted trees take minutes: final evaluation only
  ev.batch_size = 500

  config.sample.ddim_steps = 50  # the final figures; 200 (official) takes long on a CPU
  config.sample.num_images = 8
  return config
