r"""Imports an official EncDiff checkpoint into a workdir that our tools use like one of our own runs.

  python -m concept_diffusion.interop.import_official --ckpt=last.ckpt \
      [--autoencoder_ckpt=vq.ckpt] --config=configs/procedural_shapes.py --workdir=runs/imported

Writes, under --workdir:
  config.json                  the config (as experiments/train.py does; later runs on the workdir must match it)
  diffusion/<global_step>/     DiffusionState: parameters, EMA UNet (from model_ema.*), encoder BatchNorm statistics,
                               scale_factor, step = the checkpoint's global_step and a fresh optimizer state
  autoencoder/<num_steps>/     FirstStageState at first_stage.num_steps, so training treats the first stage as done

`experiments/train.py` with the same --config and --workdir then skips the first stage and resumes the diffusion
stage at global_step (raise --config.train.num_steps to fine-tune further); evaluation and visualisation read the
workdir as usual.

The optimizer state is fresh because the official checkpoint's AdamW moments are keyed by PyTorch parameter order,
not by name. Adam's moments and bias-correction count start at zero; the learning-rate schedule continues at
global_step (no second warm-up), as the official LambdaLinearScheduler would.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Optional

from absl import app, flags, logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.interop import official
from concept_diffusion.models import autoencoder
from concept_diffusion import states
from concept_diffusion.config import validate_config
from concept_diffusion.workdir import AE_DIR, DIFFUSION_DIR, check_or_write_config, workdir_lock
from concept_diffusion.errors import UserError


def _as_jax_like(tree: Any, template: Any, what: str) -> Any:
  """numpy tree -> jax arrays with the template's dtypes; the structures and shapes must agree."""
  if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(template):
    raise UserError(f"Imported {what} do not have the structure of the model built from the config.")

  def convert(x, t):
    if tuple(np.shape(x)) != tuple(t.shape):
      raise UserError(f"Imported {what}: shape {np.shape(x)} where the model has {t.shape}.")
    return jnp.asarray(x, dtype=t.dtype)
  return jax.tree_util.tree_map(convert, tree, template)


def _jit_once(fn):
  """jit for a function run once: LLVM's expensive passes would cost more than they save (RNG-only init code,
  so the result does not depend on them)."""
  try:
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0,
                                         "xla_llvm_disable_expensive_passes": True})
  except TypeError:  # a jax without per-jit compiler options
    return jax.jit(fn)


# optax states whose `init` is all zeros (moments, counters); see init_optimizer.
_ZERO_INIT_STATES = (optax.ScaleByAdamState, optax.EmptyState, optax.ScaleByScheduleState)


def init_optimizer(tx: optax.GradientTransformation, params: Any) -> optax.OptState:
  """tx.init(params) without compiling when the state is known to start at zero.

  Eager init builds each zero moment with its own small XLA compile and jit compiles one large program; both
  take seconds on a CPU for a state that is all zeros for Adam/AdamW. Other optimizers take the general path.
  """
  abstract = jax.eval_shape(tx.init, params)
  nodes = jax.tree_util.tree_leaves(abstract, is_leaf=lambda s: isinstance(s, _ZERO_INIT_STATES))
  if all(isinstance(n, _ZERO_INIT_STATES) for n in nodes):
    # Host zeros then one transfer: jnp.zeros would compile a broadcast per distinct shape.
    return jax.device_put(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract))
  return jax.jit(tx.init)(params)


def fresh_optimizer_state(config: ml_collections.ConfigDict, params: Any, step: int) -> optax.OptState:
  """The diffusion optimiser's initial state for `params`, with the learning-rate schedule's count moved to `step`.

  Only the schedule's counter moves: Adam's own count stays 0 so that its bias correction matches its zero
  moments, while the learning rate continues where the official run was instead of warming up again.
  """
  opt_state = init_optimizer(states.diffusion_optimizer(config.train)[0], params)
  is_schedule = lambda s: isinstance(s, optax.ScaleByScheduleState)

  def move(s):
    return s._replace(count=jnp.asarray(step, s.count.dtype)) if is_schedule(s) else s
  return jax.tree_util.tree_map(move, opt_state, is_leaf=is_schedule)


def make_diffusion_state(config: ml_collections.ConfigDict, weights: official.ImportedWeights, step: int,
                         template: Optional[states.DiffusionState] = None) -> states.DiffusionState:
  """The imported weights as a DiffusionState at `step` (template: the abstract state, built when not given)."""
  template = template if template is not None else official.abstract_diffusion_state(config)
  params = _as_jax_like(weights.params, template.params, "parameters")
  return states.DiffusionState(
      step=jnp.asarray(step, template.step.dtype),
      params=params,
      batch_stats=_as_jax_like(weights.batch_stats, template.batch_stats, "BatchNorm statistics"),
      opt_state=fresh_optimizer_state(config, params, step),
      ema_unet=_as_jax_like(weights.ema_unet, template.ema_unet, "EMA parameters"),
      scale_factor=jnp.asarray(weights.scale_factor, template.scale_factor.dtype).reshape(()),
      nonfinite_steps=jnp.zeros((), template.nonfinite_steps.dtype))


def make_first_stage_state(config: ml_collections.ConfigDict, weights: official.ImportedWeights,
                           rng: jax.Array) -> states.FirstStageState:
  """A finished-looking FirstStageState: imported autoencoder (and discriminator when it fits), fresh optimizers.

  Built from the abstract state rather than create_first_stage_state, which would also initialise (and compile)
  an autoencoder only to throw it away.
  """
  template = official.abstract_first_stage_state(config)
  ae_params = _as_jax_like(weights.ae_params, template.ae_params, "autoencoder parameters")
  if weights.disc_params is not None:
    disc_params = _as_jax_like(weights.disc_params, template.disc_params, "discriminator parameters")
    disc_stats = _as_jax_like(weights.disc_batch_stats, template.disc_batch_stats, "discriminator statistics")
  else:
    size, channels = config.data.image_size, config.data.channels
    disc = autoencoder.build_discriminator(config.first_stage)
    disc_vars = _jit_once(functools.partial(disc.init, train=False))(rng, jnp.zeros((1, size, size, channels)))
    disc_params, disc_stats = disc_vars["params"], disc_vars["batch_stats"]
  ae_tx, disc_tx = states.make_first_stage_optimizers(config)
  state = template.replace(step=jnp.asarray(max(config.first_stage.num_steps, 1), template.step.dtype),
                          ae_params=ae_params, ae_opt_state=init_optimizer(ae_tx, ae_params),
                          disc_params=disc_params, disc_batch_stats=disc_stats,
                          disc_opt_state=init_optimizer(disc_tx, disc_params),
                          nonfinite_steps=jnp.zeros((), template.nonfinite_steps.dtype))
  unfilled = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state)
              if isinstance(leaf, jax.ShapeDtypeStruct)]
  if unfilled:  # FirstStageState grew a field this importer does not know
    raise NotImplementedError(f"make_first_stage_state does not fill FirstStageState fields {unfilled}.")
  return state


def _refuse_existing(directory: str) -> None:
  path = epath.Path(directory)
  if path.is_dir() and any(path.iterdir()):
    raise UserError(f"{directory} already holds checkpoints: import into a new --workdir (an import never "
                     "overwrites or mixes with an existing run).")


def import_checkpoint(ckpt: str, config: ml_collections.ConfigDict, workdir: str, *,
                      autoencoder_ckpt: Optional[str] = None, trust_pickle: bool = False,
                      ema_from_params: bool = False, scale_factor: Optional[float] = None,
                      global_step: Optional[int] = None, seed: int = 0) -> int:
  """Imports an official checkpoint into `workdir`; returns the diffusion step it was saved at.

  Args:
    ckpt: official LatentDiffusion checkpoint (.ckpt/.pt needs torch; .safetensors/.npz do not).
    config: our config describing the checkpoint's architecture and schedule.
    workdir: a new workdir.
    autoencoder_ckpt: the official autoencoder checkpoint (for a ckpt without first_stage_model.*, or to bring the
      discriminator along).
    trust_pickle: see official.load_state_dict.
    ema_from_params: start the EMA from the raw weights when the checkpoint has none.
    scale_factor: override for a checkpoint without a scale_factor buffer.
    global_step: override for a file that does not record its step (bare state dicts).
    seed: for the parts that start fresh (discriminator when absent).
  """
  validate_config(config)
  diffusion_dir, ae_dir = os.path.join(workdir, DIFFUSION_DIR), os.path.join(workdir, AE_DIR)
  _refuse_existing(diffusion_dir)
  if config.first_stage.kind != "none":
    _refuse_existing(ae_dir)
  loaded = official.load_state_dict(ckpt, trust_pickle=trust_pickle)
  ae_loaded = (official.load_state_dict(autoencoder_ckpt, trust_pickle=trust_pickle)
               if autoencoder_ckpt else None)
  step = global_step if global_step is not None else loaded.global_step
  if step is None or step < 1:
    raise UserError(
        f"{ckpt!r} records global_step={step}; the imported state needs a step >= 1 (its step is the diffusion "
        "checkpoint's number, and step 0 means 'no checkpoint' to the training loop). Pass --global_step=N.")
  template = official.abstract_diffusion_state(config)
  weights = official.import_state_dict(
      loaded.state_dict, config, autoencoder_state_dict=ae_loaded.state_dict if ae_loaded else None,
      ema_from_params=ema_from_params, scale_factor=scale_factor,
      layout=official.checkpoint_layout(config, template))
  if weights.ema_num_updates is not None and weights.ema_num_updates not in (step, -1):
    # Our EMA warm-up decay is a function of the step; the official one of num_updates (they differ only with
    # gradient accumulation). Past ~10k updates both are 0.9999, so this only matters for very early checkpoints.
    logging.warning("model_ema.num_updates=%d differs from global_step=%d; the EMA warm-up continues from the step.",
                    weights.ema_num_updates, step)

  with workdir_lock(workdir):  # no training may write this workdir meanwhile
    check_or_write_config(config, workdir)

    state = make_diffusion_state(config, weights, step, template)
    ckpts = StageCheckpoints(diffusion_dir, keep=config.train.keep_checkpoints)
    ckpts.save(step, state, force=True)
    ckpts.close()
    logging.info("Wrote %s/%d (scale_factor %.5f).", diffusion_dir, step, float(weights.scale_factor))

    if weights.ae_params is not None:
      fs_state = make_first_stage_state(config, weights, jax.random.PRNGKey(seed))
      fs_step = int(fs_state.step)
      ckpts = StageCheckpoints(ae_dir, keep=config.train.keep_checkpoints)
      ckpts.save(fs_step, fs_state, force=True)
      ckpts.close()
      logging.info("Wrote %s/%d (discriminator %s).", ae_dir, fs_step,
                   "imported" if weights.disc_params is not None else "fresh")
  return step


# ----------------------------------------------------------------------------------------------------------------
# CLI.

def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py) describing the checkpoint.",
                                           lock_config=True)
  flags.DEFINE_string("ckpt", None, "Official checkpoint: Lightning .ckpt (needs torch), .safetensors or .npz.")
  flags.DEFINE_string("autoencoder_ckpt", None, "Official autoencoder checkpoint (keys without first_stage_model.).")
  flags.DEFINE_string("workdir", None, "New workdir to write.")
  flags.DEFINE_bool("trust_pickle", False, "Really unpickle the ckpt's non-tensor objects (only for trusted files; "
                    "by default they become inert placeholders, which is enough for the weights).")
  flags.DEFINE_bool("ema_from_params", False, "Start the EMA from the raw UNet weights if the ckpt has no EMA.")
  flags.DEFINE_float("scale_factor", None, "Latent scale factor, for a ckpt without the scale_factor buffer.")
  flags.DEFINE_integer("global_step", None, "Step to record, for a file that does not record one.")
  flags.mark_flags_as_required(["config", "ckpt", "workdir"])
  return config


def main(argv, config_flag) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  try:
    step = import_checkpoint(f.ckpt, config_flag.value, f.workdir, autoencoder_ckpt=f.autoencoder_ckpt,
                             trust_pickle=f.trust_pickle, ema_from_params=f.ema_from_params,
                             scale_factor=f.scale_factor, global_step=f.global_step)
  except (ValueError, FileNotFoundError, ImportError) as e:
    # One clear message, not a traceback, for errors that are the user's to fix.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Imported {f.ckpt} into {f.workdir} (diffusion step {step}).")


if __name__ == "__main__":
  _config_flag = _define_flags()
  app.run(lambda argv: main(argv, _config_flag))
