"""What each stage's checkpoint holds: the train states, their initialisation, optimisers and abstract shapes.

The trainers (train/) update these states; everything that reads a checkpoint (load_run, evaluation, figures,
interop) restores onto the same structure from here, without importing the trainer.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from concept_diffusion import parallel, workdir as workdir_lib
from concept_diffusion.checkpoint import StageCheckpoints, restore_checkpoint
from concept_diffusion.models import autoencoder
from concept_diffusion.models.encdiff import EncDiff, build_model
from concept_diffusion.errors import UserError

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class FirstStageState:
  """Everything that changes during first-stage training; checkpointed as one pytree."""
  step: Array
  ae_params: PyTree
  disc_params: PyTree
  disc_batch_stats: PyTree
  ae_opt_state: optax.OptState
  disc_opt_state: optax.OptState
  nonfinite_steps: Array  # steps whose update was dropped for a NaN/Inf (see jit_step.guard_nonfinite)


def check_perceptual(fs: ml_collections.ConfigDict) -> None:
  if fs.lpips_weights:
    raise NotImplementedError(
        f"config.first_stage.lpips_weights={fs.lpips_weights!r}: the LPIPS perceptual loss (VGG16 features + "
        "learned linear heads) is not implemented in concept_diffusion yet. Set "
        "--config.first_stage.lpips_weights='' to train with L1 + codebook/KL + GAN losses only (perceptual "
        "loss off), which is a deviation from the official VQLPIPSWithDiscriminator.")


def check_first_stage_kind(config: ml_collections.ConfigDict) -> str:
  kind = config.first_stage.kind
  if kind == "none":
    raise UserError("config.first_stage.kind='none' has no autoencoder to train: skip the first stage and run the "
                     "diffusion stage in pixel space.")
  if kind not in autoencoder.FIRST_STAGE_KINDS:
    raise UserError(f"config.first_stage.kind={kind!r}: the trainer knows the losses of 'vq' and 'kl' only. Train "
                     "this first stage elsewhere and give its workdir as first_stage.checkpoint, with 'first_stage' "
                     "left out of config.stages.")
  return kind


def make_first_stage_optimizers(
    config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(autoencoder, discriminator) optimizers: taming's two Adam(lr, betas=(b1, b2)), same lr."""
  fs = config.first_stage
  make = lambda: optax.adam(fs.lr, b1=fs.b1, b2=fs.b2)
  return make(), make()


def create_first_stage_state(config: ml_collections.ConfigDict, rng: Array) -> FirstStageState:
  """Initialises autoencoder, discriminator and both optimizers for `config.data` images."""
  check_first_stage_kind(config)
  fs = config.first_stage
  check_perceptual(fs)
  if fs.perceptual_weight > 0:
    logging.log_first_n(logging.WARNING, "first stage: perceptual (LPIPS) loss is OFF (config.first_stage."
                        "lpips_weights is empty); training with L1 + %s + GAN only.", 1,
                        "codebook" if fs.kind == "vq" else "KL")
  channels = config.data.channels
  model = autoencoder.build_first_stage(fs, channels)
  disc = autoencoder.build_discriminator(fs)
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, channels), jnp.float32)
  ae_rng, disc_rng = jax.random.split(rng)
  # jit: eager Flax init dispatches hundreds of small ops one by one, which is far slower than one compile.
  ae_params = jax.jit(model.init)(ae_rng, x)["params"]
  disc_vars = jax.jit(functools.partial(disc.init, train=False))(disc_rng, x)
  ae_tx, disc_tx = make_first_stage_optimizers(config)
  return FirstStageState(
      step=jnp.zeros((), jnp.int32),
      ae_params=ae_params,
      disc_params=disc_vars["params"],
      disc_batch_stats=disc_vars["batch_stats"],
      ae_opt_state=ae_tx.init(ae_params),
      disc_opt_state=disc_tx.init(disc_vars["params"]),
      nonfinite_steps=jnp.zeros((), jnp.int32),
  )


def abstract_first_stage_state(config: ml_collections.ConfigDict) -> FirstStageState:
  return jax.eval_shape(functools.partial(create_first_stage_state, config), jax.random.PRNGKey(0))


def first_stage_state_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> FirstStageState:
  return parallel.fsdp_shardings(abstract_first_stage_state(config), mesh, config.mesh.fsdp_min_size)


@flax.struct.dataclass
class DiffusionState:
  step: jax.Array
  params: Any  # {"encoder": ..., "unet": ...}
  batch_stats: Any  # encoder BatchNorm running statistics
  opt_state: Any
  ema_unet: Any
  scale_factor: jax.Array  # 1/std of the first batch's latents; 1 in pixel space
  nonfinite_steps: jax.Array  # steps whose update was dropped for a NaN/Inf (see jit_step.guard_nonfinite)


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """LDM's LambdaLinearScheduler: linear warm-up from 1e-6 * lr to lr, then constant."""
  return optax.linear_schedule(1e-6 * train_config.lr, train_config.lr, max(train_config.warmup_steps, 1))


def make_optimizer(train_config: ml_collections.ConfigDict,
                   lr_schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with torch's defaults (weight decay 0.01 in the official config), after clipping the gradient's global
  norm to train.grad_clip_norm when that is > 0 (official: no clipping)."""
  adamw = optax.adamw(lr_schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_config.weight_decay)
  clip = train_config.grad_clip_norm
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def diffusion_optimizer(
    train_config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimiser, learning-rate schedule) of the diffusion stage: the one place they are made from the config (the
  trainer, restoring a checkpoint and importing official weights all need the same optimiser-state structure)."""
  lr_schedule = learning_rate_schedule(train_config)
  return make_optimizer(train_config, lr_schedule), lr_schedule


def build_diffusion(config: ml_collections.ConfigDict) -> tuple[EncDiff, optax.GradientTransformation, optax.Schedule]:
  """(model, optimiser, learning-rate schedule) of a config: everything the step closes over but the EMA decay."""
  return (build_model(config), *diffusion_optimizer(config.train))


def create_state(model: EncDiff, tx: optax.GradientTransformation, rng: jax.Array) -> DiffusionState:
  variables = model.init(rng)
  params = variables["params"]
  return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                        opt_state=tx.init(params), ema_unet=jax.tree_util.tree_map(jnp.copy, params["unet"]),
                        scale_factor=jnp.ones((), jnp.float32), nonfinite_steps=jnp.zeros((), jnp.int32))


def abstract_state(model: EncDiff, tx: optax.GradientTransformation) -> DiffusionState:
  return jax.eval_shape(functools.partial(create_state, model, tx), jax.random.PRNGKey(0))


def diffusion_state_shardings(model: EncDiff, tx: optax.GradientTransformation, mesh: Mesh,
                              fsdp_min_size: int) -> DiffusionState:
  return parallel.fsdp_shardings(abstract_state(model, tx), mesh, fsdp_min_size)


def restore_diffusion_state(config: ml_collections.ConfigDict, workdir: str,
                            step: int | None = None) -> DiffusionState:
  """The diffusion-stage state of a run (latest step by default), with a clear error when there is none."""
  model, tx, _ = build_diffusion(config)
  return restore_checkpoint(os.path.join(workdir, workdir_lib.DIFFUSION_DIR), abstract_state(model, tx), step,
                            "diffusion")


def restore_first_stage_state(config: ml_collections.ConfigDict, ckpts: StageCheckpoints,
                              mesh: Mesh | None = None) -> FirstStageState:
  """The latest readable first-stage checkpoint (sharded over `mesh` when given)."""
  template = abstract_first_stage_state(config)
  if mesh is not None:
    template = parallel.with_shardings(template, first_stage_state_shardings(config, mesh))
  return ckpts.restore(template, what="first_stage")


def restore_first_stage_params(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """The trained first stage of a run (None in pixel space), with a clear error when it is missing."""
  if config.first_stage.kind == "none":
    return None
  # Only reads: a first_stage.checkpoint that points at the wrong directory must not gain an empty stage folder.
  with StageCheckpoints(workdir_lib.first_stage_dir(config, workdir), keep=config.train.keep_checkpoints,
                        create=False) as ckpts:
    if ckpts.latest_step() is None:
      raise FileNotFoundError(f"No first-stage checkpoint in {ckpts.directory}.")
    return restore_first_stage_state(config, ckpts).ae_params
