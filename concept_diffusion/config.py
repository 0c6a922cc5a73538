"""The config: its complete schema with the official EncDiff values, validation, and what may change on resume.

Every config in configs/ starts from `get_base_config()` and changes values only: a field that is not
here is a typo, and `validate_config` says so. Where the paper and the official code disagree the
comment says so; the default is the official code's value (configs/latent-diffusion/*-vq-4-16-encdiff.yaml).
"""
from __future__ import annotations

import difflib
import importlib
import json
from typing import Any

import ml_collections

from concept_diffusion.errors import UserError

# The sections an extension's fields go into: an encoder registered as "vit" gets config.encoder.vit.*, a first
# stage config.first_stage.<name>.*, a conditioning config.unet.<name>.* (beside the field that picks it:
# encoder.kind, first_stage.kind, unet.conditioning).
EXTENSION_SECTIONS = ("encoder", "first_stage", "unet")
# (section, name) -> the extension's fields at their defaults, added by models/encdiff.py's register_* calls.
_EXTENSION_FIELDS: dict[tuple[str, str], ml_collections.ConfigDict] = {}


def add_extension_fields(section: str, name: str, defaults: ml_collections.ConfigDict | dict) -> None:
  """Gives every config made from now on the fields `config.<section>.<name>.*` at `defaults`: overridable on the
  command line (--config.<section>.<name>.<field>=...), saved in config.json and checked on resume like any other
  field. Called by the register_* functions; the module that calls them goes in config.extensions."""
  if section not in EXTENSION_SECTIONS:
    raise ValueError(f"extension fields go into one of {EXTENSION_SECTIONS}, not {section!r}.")
  if name in _core_config()[section]:
    raise ValueError(f"{section}.{name} is already a config field; register the extension under another name.")
  _EXTENSION_FIELDS[(section, name)] = ml_collections.ConfigDict(dict(defaults))


def _add_missing_extension_fields(config: ml_collections.ConfigDict) -> None:
  with config.unlocked():  # a config from config_flags is locked against new fields
    for (section, name), defaults in _EXTENSION_FIELDS.items():
      if name not in config[section]:
        config[section][name] = ml_collections.ConfigDict(defaults.to_dict())


def get_base_config() -> ml_collections.ConfigDict:
  """Every field, at its default: the built-in schema plus the fields of the extensions registered so far."""
  config = _core_config()
  _add_missing_extension_fields(config)
  return config


def _core_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "procedural_shapes"
  config.seed = 23  # official main_val.py --seed default
  # Stages `experiments/train.py` runs, in order. Leave out "first_stage" to reuse a trained autoencoder from
  # first_stage.checkpoint (a workdir whose autoencoder/ holds a finished run).
  config.stages = ("first_stage", "diffusion")
  # Python modules imported before the model is built, e.g. ("my_lab.vit_encoder",): a module that registers an
  # encoder, a conditioning or a first stage (models/encdiff.py, docs/extending.md). Kept in config.json, so
  # evaluation, figures and load_run import them too.
  config.extensions = ()

  config.data = ml_collections.ConfigDict()
  config.data.name = "procedural_shapes"  # ground-truth dataset, see concept_diffusion.data.get_dataset
  config.data.image_size = 64  # paper: 64x64 for all datasets
  config.data.channels = 3
  config.data.tfds_data_dir = ""  # for TFDS-backed datasets (local path or gs://)
  config.data.manual_dir = ""  # for datasets read from the official download files
  # Real datasets (docs/data.md): "files" reads the official downloads in manual_dir, "tfds" a prepared TFDS
  # dataset in tfds_data_dir (python -m concept_diffusion.data.prepare), "auto" = tfds if tfds_data_dir is set.
  config.data.source = "auto"
  # Where compressed downloads are converted once to memory-mapped .npy, and where the canonical order of TFDS
  # records is cached; "" = beside the data (manual_dir, or the TFDS dataset's folder; ~/.cache for gs://).
  # procedural_shapes with data.supersample > 1: where its render cache goes; "" = no cache (render every batch).
  config.data.cache_dir = ""
  # () = the dataset's official factor sizes; otherwise the sizes the data must have, e.g. MPI3D real_complex
  # (4, 4, 2, 3, 3, 40, 40) read as data.name=mpi3d_real. Data with other sizes is an error, never reshaped.
  config.data.factor_sizes = ()
  # procedural_shapes only: s x s rays per pixel, box-filtered (and rounded to 8 bits), so that edges are
  # anti-aliased like the real 3dshapes renders (4 in the procedural configs). 1 = one ray through each pixel's
  # centre: hard edges, where at 32x32 one step of scale flips ~36 edge pixels all the way; the default only
  # because a workdir saved before this field existed was rendered so. With data.cache_dir set, the whole dataset
  # is rendered once into a uint8 .npy there and read afterwards (evaluation would otherwise re-cast 16 rays per
  # pixel of all 480,000 images).
  config.data.supersample = 1
  config.data.loader_threads = 4  # grain threads that read/decode this process's share of each batch
  config.data.prefetch_batches = 8  # batches read ahead of the train step (>= loader_threads keeps them busy)

  # First stage: VQ-reg autoencoder, f=4 (configs/autoencoder/shapes3d_vq_4_16.yaml).
  fs = config.first_stage = ml_collections.ConfigDict()
  fs.kind = "vq"  # a registered first stage (models/encdiff.py): vq (official) | kl (DisDiff's *_kl_4_16 variant) | none (pixel-space diffusion, paper Table 6)
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
  enc.kind = "concept_cnn"  # a registered encoder (models/encdiff.py: register_encoder); concept_cnn reads all below
  enc.num_tokens = 20  # latent_unit; paper App. H Table 12 ablates 5..30
  enc.token_dim = 16  # context_dim; paper text says 32 ("following DisDiff"), the code and the 42.3M count say 16
  enc.width = 128  # d
  enc.mlp_widths = (64, 128)
  # Stride of each of Encoder4's four 4x4 convolutions (official: all 2, so 64x64 -> 4x4). A stride of 1 keeps the
  # map's size ("same" padding), e.g. (2, 2, 2, 1) keeps the official 4x4 map on 32x32 images instead of 2x2:
  # the object is then still a cell of its own before the flatten.
  enc.strides = (2, 2, 2, 2)
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
  # Space-to-depth stem: the UNet sees each p x p patch of x_t as one position with p*p*C channels and predicts
  # the noise back through the inverse (pixel shuffle). 1 = official. The map is exact and orthogonal, so the
  # model, the noise and the loss are the pixel-space ones; only the UNet works at 1/p of the resolution (on a CPU
  # the full-resolution level is most of the step). attention_resolutions count from the patch grid.
  unet.patch_size = 1
  # How the tokens reach the UNet (a registered conditioning, models/conditioning.py). cross_attention: keys/values of every SpatialTransformer (official, the paper's
  # model). adagn: the paper's Table 3 ablation "EncDiff w/ AdaGN" -- tokens concatenated into one vector that scales
  # each ResBlock's normalised features as Diff-AE's AdaGN does; the transformers keep self-attention + MLP only.
  # none: an unconditional UNet (a control: the encoder then gets no gradient).
  unet.conditioning = "cross_attention"
  # How (never what) the UNet computes; docs/performance.md. auto: convolutions over maps of <= 4x4 and 1x1
  # convolutions as matmuls on CPU (XLA:CPU's conv is 10-25x slower there), XLA's conv elsewhere | xla | matmul.
  unet.conv_impl = "auto"
  # Attention whose probabilities are not being captured. auto: einsum on CPU (normalises the small output, not
  # the probabilities); on a CUDA GPU cuDNN's fused flash attention when the compute dtype is bf16/fp16 (and XLA's
  # if this host's cuDNN cannot run it); xla elsewhere | xla / cudnn (jax.nn.dot_product_attention's
  # implementations) | einsum. The cross-attention whose maps are captured always computes them explicitly.
  unet.attention_impl = "auto"
  # Recompute ResBlock/SpatialTransformer activations in the backward pass (memory for ~20% more FLOPs), for large
  # batches on GPU/TPU. Leave it off on CPU: XLA:CPU schedules the recomputation early and the memory does not drop.
  unet.remat = False

  diff = config.diffusion = ml_collections.ConfigDict()
  diff.timesteps = 1000
  diff.beta_schedule = "linear"  # paper: cosine (Table 4 best); official config: LDM default linear
  diff.linear_start = 0.0015
  diff.linear_end = 0.0155
  diff.cosine_s = 8e-3
  diff.loss = "l1"  # paper Table 9: MSE (l2); official config: loss_type l1
  # eps: EncDiff (predict the noise of x_t). one_shot: paper Table 3's "EncDec w/o Diff" ablation, not a model
  # to train for its own sake: the UNet gets a learned input tensor instead of x_t and t = 0, and reconstructs
  # the image from the tokens in one pass (same loss). Sampling is then that single pass.
  diff.objective = "eps"
  # How training draws t. uniform: official (randint over all T). logit_normal: t/T = sigmoid(N(mean, std)),
  # as in Esser et al. 2024 (SD3): most draws at mid noise, where the tokens change the UNet's error most and the
  # encoder's gradient is largest (at small t x_t alone gives the noise, at large t nothing does). Not in the
  # paper; a budget option for short runs. The loss stays the plain unweighted noise MSE over the drawn t.
  diff.timestep_sampling = "uniform"
  diff.timestep_logit_mean = 0.0
  diff.timestep_logit_std = 1.0
  # How each drawn t weighs in the loss. none: official (plain mean over the batch). v: times 1/alpha_bar_t capped
  # at loss_weight_max, i.e. the v-prediction loss: plain eps-MSE weighs an error in the image estimate by SNR(t),
  # so at high noise, where only the tokens know the image (and the small object), it pays almost nothing for
  # getting it wrong (diffusion/schedule.py loss_weights). Not in the paper; a lever for short runs.
  diff.loss_weighting = "none"
  diff.loss_weight_max = 5.0
  # What the UNet predicts. eps: the noise (official, paper). v: sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022),
  # whose x0 = sqrt(a) x_t - sqrt(1 - a) v stays well conditioned where alpha_bar -> 0; with eps, the x0 the
  # sampler decodes at high noise is (x_t - sqrt(1 - a) eps) / sqrt(a), ~2e4 x the eps error at the cosine
  # schedule's end, and the global colours settled there come out wrong (docs/generation.md). Not in the paper.
  diff.prediction = "eps"

  train = config.train = ml_collections.ConfigDict()
  train.batch_size = 128  # paper: 64; official config and the reproduction reports: 128
  train.lr = 2.56e-4  # paper: 1e-4; official: base 2e-6 x batch 128 (--scale_lr)
  train.warmup_steps = 10_000  # LambdaLinearScheduler, from 1e-6*lr to lr, then constant
  train.weight_decay = 0.01  # torch AdamW default
  # Clip the gradient's global norm to this before AdamW; 0 = off (official: Lightning's default, no clipping).
  # Short CPU runs at a higher learning rate use it so that a rare large gradient cannot undo the warm-up.
  train.grad_clip_norm = 0.0
  train.ema_decay = 0.9999  # UNet only (paper: "all model parameters"; code: LitEma(self.model))
  train.scale_by_std = True  # scale_factor = 1/std(first batch latents)
  # float32 (official) | bfloat16 | auto: bfloat16 where it is faster (TPUs, GPUs from Ampere on; not CPUs, where
  # XLA:CPU's bf16 step measured slower even with AMX: hardware.native_bf16), float32 elsewhere. Only the UNet computes in it: parameters, optimiser
  # state, normalisation statistics, softmax and the loss stay float32. The accelerator recipes use auto.
  train.compute_dtype = "float32"
  train.num_steps = 40_000  # ~10 epochs of 480k at bs 128: where [fork] saw Shapes3D metrics saturate
  train.log_every = 100
  train.checkpoint_every = 2_000
  train.figure_every = 10_000  # swap grid + reconstructions to W/figures and TensorBoard (official: every 10k)
  train.keep_checkpoints = 3
  train.async_checkpoints = True  # Orbax writes in a background thread; training goes on meanwhile
  # A non-finite loss or gradient never reaches the state (the update is dropped inside the step). "stop": end
  # the run with a message naming the step (the last good checkpoint is untouched); "skip": go on and count it.
  train.on_nonfinite = "stop"

  # Device mesh (concept_diffusion/parallel.py): the global batch is split over data x fsdp devices; parameters,
  # EMA and optimiser state are replicated (fsdp=1) or sharded over fsdp along their largest divisible dimension.
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by fsdp
  mesh.fsdp = 1
  mesh.fsdp_min_size = 2 ** 14  # arrays with fewer elements stay replicated (sharding them costs more than it saves)

  # Multi-process JAX (TPU pods, multi-node GPU): see docs/scaling.md.
  dist = config.distributed = ml_collections.ConfigDict()
  dist.initialize = "auto"  # auto: when the environment is a TPU pod, a SLURM job or sets JAX_COORDINATOR_ADDRESS
  dist.coordinator_address = ""  # host:port of process 0, for clusters JAX cannot detect
  dist.num_processes = 0
  dist.process_id = -1

  ev = config.eval = ml_collections.ConfigDict()
  ev.every = 3_750  # diffusion steps between evaluations; official: every epoch (Shapes3D 480k/128); 0 = off
  ev.final = True  # evaluate the finished run with eval.metrics (written to W/eval/metrics_<step>.json)
  ev.metrics = ("beta_vae", "dci", "mig", "factor_vae")  # what EncDiff's main_val.py computes
  ev.train_metrics = ("factor_vae", "mig")  # the fast subset used during training (DCI's trees take minutes)
  # Keep the code table of every evaluation during training (W/eval/codes_<step>.npy, 38 MB each at N=20 on
  # Shapes3D), so that slow metrics can be added to those steps afterwards without a checkpoint:
  # encdiff-evaluate --from_codes --step=S --metrics=dci. Off: only the final evaluation keeps its table.
  ev.save_train_codes = False
  ev.batch_size = 256  # images per encoder call when encoding the whole dataset
  ev.seed = 0  # disentanglement_lib's evaluation.random_seed
  # Diagnostic written with every EncDiff evaluation (not a disentanglement metric): the relative increase of the
  # noise-prediction loss when each image gets another image's tokens, per band of timesteps
  # (evaluation/token_reliance.py). The same eval.seed-drawn images every time, so it is a curve over training.
  ev.token_reliance_images = 256  # 0 = off
  ev.token_reliance_bands = 5
  # Generation metrics (evaluation/generation.py; "generation" in eval.metrics or encdiff-evaluate
  # --metrics=generation): reconstructions and token swaps of generation_images seeded pairs, read back by a factor
  # reader (a small classifier trained on the dataset's own labels, cached per dataset in generation_reader_dir).
  ev.generation_images = 1_000
  ev.generation_batch_size = 100
  ev.generation_ddim_steps = 0  # 0 = sample.ddim_steps
  # Which tokens are swapped: informative (every token that carries some factor, the full swap matrix) |
  # per_factor (only the token that carries each factor most: one row per factor, cheaper) | all.
  ev.generation_tokens = "informative"
  ev.generation_reader_steps = 800
  ev.generation_reader_dir = "~/.cache/concept_diffusion/readers"

  sample = config.sample = ml_collections.ConfigDict()
  sample.ddim_steps = 200  # log_images / recon_metrics
  sample.eta = 1.0
  # Clip the sampler's x0 estimates to the data range: auto = on where the UNet works on pixels ([-1, 1]), off
  # in a latent space (LDM's DDIM does not clip latents). Pixel-space runs are unstable without it: near
  # alpha_bar_T = 2.4e-9 (cosine) x0 = (x - sqrt(1-a) eps) / sqrt(a) multiplies eps errors by ~2e4
  # (diffusion/sampling.py; measured in docs/generation.md).
  sample.clip_x0 = "auto"  # auto | on | off
  # Which timesteps a DDIM chain of ddim_steps visits: leading (LDM's uniform grid, official) | trailing (Lin et
  # al. 2024: always starts at T - 1).
  sample.timestep_spacing = "leading"
  # Start the chain at the largest t with alpha_bar_t >= this (0 = at the end of the schedule, official): a floor
  # on the terminal SNR.
  sample.min_alpha_bar = 0.0
  sample.num_images = 8
  sample.final_figures = True  # write every figure (swap grid, attention maps, ...) when training finishes

  # Baselines (concept_diffusion/baselines): disentanglement_lib's VAEs instead of EncDiff, trained by the same
  # experiments/train.py on the same data order, checkpoints, metrics.jsonl and evaluation (eval.*). Values are
  # disentanglement_lib's unsupervised_study_v1 (model_configs/shared.gin, sweep.py). The sections above that
  # describe EncDiff (first_stage, encoder, unet, diffusion, train) are ignored by a baseline run.
  bl = config.baseline = ml_collections.ConfigDict()
  bl.kind = ""  # "" (EncDiff) | beta_vae | beta_tcvae
  # beta_vae: weight of the KL (study sweep 1, 2, 4, 6, 8, 16); beta_tcvae: the TC term gets weight beta - 1
  # (sweep 1, 2, 4, 6, 8, 10). Configs set it per model (configs/baseline_*.py).
  bl.beta = 4.0
  bl.latent_dim = 10  # encoder.num_latent
  bl.batch_size = 64
  bl.lr = 1e-4  # Adam, no weight decay, no schedule
  bl.b1 = 0.9
  bl.b2 = 0.999
  bl.eps = 1e-8
  bl.num_steps = 300_000  # model.training_steps
  bl.log_every = 100
  bl.checkpoint_every = 5_000
  return config


# Fields a user may change between invocations on one workdir: they extend or observe a run without
# changing what it computes.
RESUMABLE_FIELDS = (
    "train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.figure_every",
    "first_stage.num_steps", "first_stage.log_every", "first_stage.checkpoint_every",
    "sample.", "eval.", "stages", "name", "train.async_checkpoints", "train.on_nonfinite", "mesh.", "distributed.",
    "data.tfds_data_dir", "data.manual_dir", "data.loader_threads", "data.prefetch_batches", "data.cache_dir",
    "data.source",
    "baseline.num_steps", "baseline.log_every", "baseline.checkpoint_every",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, (dict, ml_collections.ConfigDict)):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


# The domain of every numeric field: (fields, test, what the value must be). Checked before any work, on a resume
# too (a field that may change between invocations, such as train.keep_checkpoints, is checked each time).
def _positive(v): return v > 0
def _non_negative(v): return v >= 0
def _at_least_one(v): return v >= 1
def _fraction(v): return 0 <= v < 1
def _unit(v): return 0 <= v <= 1


NUMERIC_DOMAINS = (
    (("train.lr", "first_stage.lr", "baseline.lr", "baseline.eps", "encoder.bn_eps", "diffusion.linear_start",
      "diffusion.linear_end", "diffusion.timestep_logit_std"), _positive, "> 0"),
    (("train.num_steps", "first_stage.num_steps", "baseline.num_steps", "train.warmup_steps", "train.weight_decay",
      "train.grad_clip_norm", "first_stage.beta",
      "first_stage.kl_weight", "first_stage.pixel_weight", "first_stage.perceptual_weight",
      "first_stage.codebook_weight", "first_stage.disc_start", "first_stage.disc_weight", "first_stage.disc_factor",
      "diffusion.cosine_s", "sample.eta", "sample.min_alpha_bar", "eval.generation_ddim_steps", "eval.every",
      "eval.seed", "train.figure_every", "data.loader_threads", "data.prefetch_batches", "mesh.fsdp_min_size",
      "first_stage.disc_layers", "baseline.beta", "eval.token_reliance_images"),
     _non_negative, ">= 0 (train.num_steps=0 scores the untrained model; eval.every/train.figure_every=0: off)"),
    (("train.log_every", "train.checkpoint_every", "first_stage.log_every", "first_stage.checkpoint_every",
      "baseline.log_every", "baseline.checkpoint_every", "train.keep_checkpoints", "train.batch_size",
      "first_stage.batch_size", "baseline.batch_size", "eval.batch_size", "eval.generation_images",
      "eval.generation_batch_size", "eval.generation_reader_steps", "sample.ddim_steps", "sample.num_images",
      "diffusion.timesteps", "data.image_size", "data.channels", "encoder.num_tokens", "encoder.token_dim",
      "encoder.width", "unet.model_channels", "unet.num_heads", "unet.transformer_depth", "unet.norm_groups",
      "unet.num_res_blocks", "first_stage.ch", "first_stage.num_res_blocks", "first_stage.z_channels",
      "first_stage.embed_dim", "first_stage.n_embed", "first_stage.norm_groups", "first_stage.disc_ndf",
      "baseline.latent_dim", "mesh.fsdp", "data.supersample", "unet.patch_size", "eval.token_reliance_bands",
      "diffusion.loss_weight_max"), _at_least_one, ">= 1"),
    (("unet.dropout", "first_stage.dropout", "encoder.bn_momentum", "first_stage.b1", "first_stage.b2",
      "baseline.b1", "baseline.b2"), _fraction, "in [0, 1)"),
    (("train.ema_decay", "diffusion.linear_end"), _unit, "in [0, 1]"),
)


def _check_domains(config: ml_collections.ConfigDict) -> None:
  values, defaults = _flatten(config_to_dict(config)), _flatten(config_to_dict(get_base_config()))
  for fields, test, domain in NUMERIC_DOMAINS:
    for field in fields:
      value = values.get(field)
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value)):
        raise UserError(f"Invalid config: {field}={value!r}; it must be {domain} (default {defaults[field]!r}).")
  checks = [
      (config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data must be -1 (all devices fsdp leaves) or >= 1"),
      (config.sample.ddim_steps <= config.diffusion.timesteps,
       f"sample.ddim_steps={config.sample.ddim_steps} must be <= diffusion.timesteps={config.diffusion.timesteps}"),
      (config.data.image_size % config.unet.patch_size == 0 or config.first_stage.kind != "none",
       f"unet.patch_size={config.unet.patch_size} must divide data.image_size={config.data.image_size}"),
      (all(s in (1, 2) for s in config.encoder.strides) and len(config.encoder.strides) == 4,
       f"encoder.strides={tuple(config.encoder.strides)} must be four strides of 1 or 2 (Encoder4's convolutions)"),
      (config.diffusion.linear_start < config.diffusion.linear_end,
       "diffusion.linear_start must be < diffusion.linear_end"),
      # Without a trained first stage the diffusion stage would train on a random autoencoder.
      ("first_stage" not in config.stages or config.first_stage.kind == "none" or config.first_stage.num_steps >= 1,
       f"first_stage.num_steps={config.first_stage.num_steps} must be >= 1 when 'first_stage' is in stages"),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(f"Invalid config: {message}.")


# evaluation.metrics.ALL_METRICS, named here so that checking a config does not import sklearn (tests/test_metrics.py
# keeps the two equal).
EVAL_METRICS = ("beta_vae", "dci", "mig", "factor_vae", "sap", "modularity")


def _metric_names_check(config: ml_collections.ConfigDict, field: str) -> tuple[bool, str]:
  """eval.<field> names known metrics. Checked before training: otherwise a typo, or a comma list given where a
  tuple belongs (`--config.eval.metrics=dci,mig` is the one string 'dci,mig'), fails at the first evaluation."""
  names = config.eval[field]
  known = EVAL_METRICS + ("generation",)  # evaluation/generation.py, scored from samples rather than codes
  bad = [name for name in names if name not in known] if isinstance(names, (tuple, list)) else [names]
  return (not bad, f"eval.{field} has {', '.join(map(repr, bad))}, which is not a metric name; it must be a tuple of "
          f"names from {known}, e.g. --config.eval.{field}=\"('factor_vae','mig')\"")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One clear UserError for a field the schema does not know or a value outside its domain.

  Names that the code defines (registered encoders, conditionings and first stages, schedules, kernels) are
  checked where they are defined, by models/encdiff.py's build_model, so that this module imports no model code.
  """
  import_extensions(config)
  known = _flatten(config_to_dict(get_base_config()))
  for key in _flatten(config_to_dict(config)):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise UserError(f"Unknown config field {key!r}.{hint} The schema is concept_diffusion/config.py.")
  _check_domains(config)
  checks = [
      (config.diffusion.loss in ("l1", "l2"), "diffusion.loss must be 'l1' or 'l2'"),
      (config.diffusion.objective in ("eps", "one_shot"), "diffusion.objective must be 'eps' or 'one_shot'"),
      (config.eval.generation_tokens in ("informative", "per_factor", "all"),
       "eval.generation_tokens must be 'informative', 'per_factor' or 'all'"),
      (config.sample.clip_x0 in ("auto", "on", "off"), "sample.clip_x0 must be 'auto', 'on' or 'off'"),
      (config.sample.min_alpha_bar < 0.5, "sample.min_alpha_bar must be < 0.5 (a floor near alpha_bar_T, e.g. 1e-4)"),
      (config.train.compute_dtype in ("float32", "bfloat16", "auto"),
       "train.compute_dtype must be float32, bfloat16 or auto"),
      (config.train.on_nonfinite in ("stop", "skip"), "train.on_nonfinite must be 'stop' or 'skip'"),
      (set(config.stages) <= {"first_stage", "diffusion"} and len(config.stages) > 0,
       "stages must be a non-empty subset of ('first_stage', 'diffusion')"),
      (config.baseline.kind in ("", "beta_vae", "beta_tcvae"), "baseline.kind must be '', 'beta_vae' or "
       "'beta_tcvae'"),
      # The disentanglement_lib encoder halves the image four times and its decoder doubles it back.
      (not config.baseline.kind or config.data.image_size % 16 == 0,
       "a baseline needs data.image_size divisible by 16 (four stride-2 convolutions)"),
      *(_metric_names_check(config, field) for field in ("metrics", "train_metrics")),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(f"Invalid config: {message}.")
  for section, groups, widths in (("unet", config.unet.norm_groups, [config.unet.model_channels * m
                                                                      for m in config.unet.channel_mult]),
                                  ("first_stage", config.first_stage.norm_groups,
                                   [config.first_stage.ch * m for m in config.first_stage.ch_mult])):
    bad = [w for w in widths if w % groups]
    if bad:
      raise UserError(f"Invalid config: {section}.norm_groups={groups} does not divide channel widths {bad}.")
  if config.first_stage.kind in ("vq", "kl"):
    factor = 2 ** (len(config.first_stage.ch_mult) - 1)
    if config.data.image_size % factor:
      raise UserError(f"Invalid config: data.image_size={config.data.image_size} is not divisible by the first "
                       f"stage's downsampling factor {factor} (first_stage.ch_mult={tuple(config.first_stage.ch_mult)}).")
  for mult in config.unet.channel_mult:
    if (mult * config.unet.model_channels) % config.unet.num_heads:
      raise UserError(f"Invalid config: unet.num_heads={config.unet.num_heads} does not divide "
                       f"{mult * config.unet.model_channels} channels.")


def _is_resumable(key: str) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUMABLE_FIELDS)

def import_extensions(config: ml_collections.ConfigDict) -> None:
  """Imports config.extensions (modules that register encoders, conditionings or first stages) and gives `config`
  the fields of what they registered, at their defaults, where it lacks them (a config made before the import)."""
  import_modules(config.extensions)
  _add_missing_extension_fields(config)


def import_modules(names) -> None:
  """Imports each module named in a config's `extensions`."""
  for name in names:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise UserError(f"config.extensions names {name!r}, which cannot be imported ({e}). Install the package "
                       "that provides it or put its directory on PYTHONPATH.") from e


def config_from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A full config from a (possibly older, partial) saved dict: fields it lacks keep their defaults. Imports the
  extensions it names first, so that their fields are in the schema."""
  import_modules(values.get("extensions", ()))
  config = get_base_config()
  _update(config, values)
  return config


def _update(config: ml_collections.ConfigDict, values: dict, section: str = "") -> None:
  for key, value in values.items():
    if isinstance(value, dict) and key not in config and section in EXTENSION_SECTIONS:
      # The fields of an extension this process has not registered (the run that wrote them had it imported
      # without naming it in config.extensions): kept as they are, so that the config still reads and compares.
      config[key] = ml_collections.ConfigDict(value)
    elif isinstance(value, dict):
      _update(config[key], value, key if not section else f"{section}.{key}")
    else:
      config[key] = tuple(value) if isinstance(value, list) else value


def differing_fields(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, this config's value)] of the fields that change what a run computes. A field added to
  the schema after `saved` was written counts as its default, so old workdirs still resume."""
  new = _flatten(config_to_dict(config))
  old = {**_flatten(config_to_dict(get_base_config())), **_flatten(saved)}
  return [(k, old.get(k), new.get(k)) for k in sorted(set(new) | set(old))
          if not _is_resumable(k) and new.get(k) != old.get(k)]
