"""Training and evaluation of the VAE baselines with EncDiff's machinery.

Same data order (the diffusion stage's seed, so a baseline and an EncDiff run of one seed see the same stream
of images), the same input pipeline, jitted+sharded step with the non-finite guard, Orbax checkpoints in
W/baseline/, metrics.jsonl (stage "baseline"), progress bar, resume/skip, and the same evaluation: the whole
dataset encoded in canonical order (the mean of q(z|x)) and scored by concept_diffusion.evaluation.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from concept_diffusion import parallel, visualize
from concept_diffusion.baselines import losses
from concept_diffusion.baselines.vae import build_vae, reparameterize, to_unit_interval
from concept_diffusion.checkpoint import StageCheckpoints, restore_checkpoint
from concept_diffusion.config import validate_config
from concept_diffusion.evaluation.encode import encode_dataset
from concept_diffusion.evaluation.evaluate import evaluate_run, format_table
from concept_diffusion.train import jit_step, trainer
from concept_diffusion.train.stage import Stage, make_pipeline, open_run, run_stage
from concept_diffusion.workdir import BASELINE_DIR, MetricWriter, eval_path, exists, figure_path, read_metrics
from concept_diffusion.errors import UserError

STAGE = "baseline"


@flax.struct.dataclass
class BaselineState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_steps: jax.Array  # steps whose update was dropped for a NaN/Inf (train/jit_step.py)


def make_optimizer(bl) -> optax.GradientTransformation:
  # TF1's AdamOptimizer adds epsilon to sqrt(v) before the bias correction, optax after; at 1e-8 that is moot.
  return optax.adam(bl.lr, b1=bl.b1, b2=bl.b2, eps=bl.eps)


def create_baseline_state(config, rng: jax.Array) -> BaselineState:
  size, channels = config.data.image_size, config.data.channels
  params = build_vae(config).init(rng, jnp.zeros((1, size, size, channels)))["params"]
  return BaselineState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=make_optimizer(config.baseline).init(params),
                       nonfinite_steps=jnp.zeros((), jnp.int32))


def abstract_state(config) -> BaselineState:
  return jax.eval_shape(functools.partial(create_baseline_state, config), jax.random.PRNGKey(0))


def baseline_train_step(state: BaselineState, images: jax.Array, rng: jax.Array, *, model: Any,
                        tx: optax.GradientTransformation, kind: str,
                        beta: float) -> tuple[BaselineState, dict[str, jax.Array]]:
  """One Adam step on reconstruction + regularizer (disentanglement_lib's BaseVAE.model_fn), images in [-1, 1]."""
  targets = to_unit_interval(images)

  def loss_fn(params):
    mean, log_var = model.apply({"params": params}, images, method="encode")
    z = reparameterize(rng, mean, log_var)
    logits = model.apply({"params": params}, z, method="decode")
    reconstruction = jnp.mean(losses.bernoulli_reconstruction(targets, logits))
    kl = losses.gaussian_kl(mean, log_var)
    tc = losses.total_correlation(z, mean, log_var)  # logged for both kinds; only beta_tcvae optimises it
    loss = reconstruction + losses.regularizer(kind, beta, kl, tc)
    return loss, {"reconstruction_loss": reconstruction, "kl_loss": kl, "tc_estimate": tc,
                  "elbo": -(reconstruction + kl)}

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def baseline_state_shardings(config, mesh) -> BaselineState:
  return parallel.fsdp_shardings(abstract_state(config), mesh, config.mesh.fsdp_min_size)


def make_train_step(config, mesh):
  """fn(state, images, rng) -> (state, metrics), jitted over the mesh; `rng` constant (the step is folded in). The
  step closes over the VAE and its optimiser, built once here."""
  bl = config.baseline
  parallel.check_batch_size(bl.batch_size, mesh, "baseline.batch_size")
  step = functools.partial(baseline_train_step, model=build_vae(config), tx=make_optimizer(bl), kind=bl.kind,
                           beta=bl.beta)
  return jit_step.jit_train_step(step, mesh, baseline_state_shardings(config, mesh))


def encoder_of(config, state: BaselineState):
  """The (num_images, latent_dim) table of posterior means: the representation disentanglement_lib scores."""
  model = build_vae(config)
  fn = lambda params, images: model.apply({"params": params}, images, method="encode")[0]
  return lambda dataset, **kwargs: encode_dataset(fn, state.params, dataset, config.eval.batch_size, **kwargs)


def restore_baseline_state(config, workdir: str, step: int | None = None) -> BaselineState:
  return restore_checkpoint(os.path.join(workdir, BASELINE_DIR), abstract_state(config), step, "baseline")


def evaluate_baseline(config, state: BaselineState, dataset, workdir: str, step: int, **kwargs):
  """evaluate_run with the baseline's code table; writes W/eval/metrics_<step>.json."""
  return evaluate_run(config, encoder_of(config, state), dataset, workdir, step, **kwargs)


def train_baseline(config: ml_collections.ConfigDict, workdir: str) -> BaselineState:
  """Trains (resumes, or skips when finished) a config.baseline.kind model in `workdir`, evaluates it."""
  with trainer.prng_context():
    return _train_baseline(config, workdir)


def _train_baseline(config: ml_collections.ConfigDict, workdir: str) -> BaselineState:
  validate_config(config)
  if not config.baseline.kind:
    raise UserError("train_baseline needs config.baseline.kind ('beta_vae' or 'beta_tcvae').")
  with open_run(config, workdir) as run:
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 40)
    with StageCheckpoints(os.path.join(workdir, BASELINE_DIR), keep=config.train.keep_checkpoints,
                          async_save=config.train.async_checkpoints) as ckpts:  # closed on every exit
      state, trained = _train_stage(config, workdir, run.dataset, run.mesh, run.writer, rng, ckpts)
    state = parallel.fetch_to_host(state, run.mesh)
    step = int(state.step)
    if config.eval.final and run.is_main and (trained or not exists(eval_path(workdir, "metrics", step))):
      scores, _ = evaluate_baseline(config, state, run.dataset, workdir, step)
      run.writer.scalars(step, {**scores, **run.writer.progress(STAGE, step)}, "eval")
      parallel.say(f"evaluation at step {step}:\n{format_table(scores)}")
    if run.is_main:
      visualize.plot_curves(read_metrics(workdir), figure_path(workdir, "loss_curves.png"))
    return state


def _train_stage(config, workdir: str, dataset, mesh, writer: MetricWriter, rng: jax.Array,
                 ckpts: StageCheckpoints) -> tuple[BaselineState, bool]:
  """The trained (or resumed, or finished) state, and whether any step ran."""
  bl = config.baseline

  def evaluate_during_training(step: int, s: BaselineState) -> None:
    if step < bl.num_steps:  # the final evaluation uses the full metric set
      scores, _ = evaluate_baseline(config, s, dataset, workdir, step, metrics=config.eval.train_metrics,
                                    progress=False, save_codes=False)
      writer.scalars(step, {**scores, **writer.progress(STAGE, step)}, "eval")

  shardings = baseline_state_shardings(config, mesh)
  stage = Stage(
      name=STAGE, num_steps=bl.num_steps, batch_size=bl.batch_size, log_every=bl.log_every,
      checkpoint_every=bl.checkpoint_every, abstract_state=abstract_state(config), shardings=shardings,
      init=lambda _: jit_step.create_sharded(functools.partial(create_baseline_state, config), rng, shardings),
      step=make_train_step(config, mesh),
      # seed + 1: the diffusion stage's data seed, so both models see the same permutation of the dataset.
      pipeline=lambda: make_pipeline(config, dataset, bl.batch_size, config.seed + 1, mesh, "baseline.batch_size"),
      hooks=[(config.eval.every, parallel.on_main_host(evaluate_during_training, mesh))])
  return run_stage(stage, ckpts, writer, jax.random.fold_in(rng, 1), config.train.on_nonfinite)
