"""A trained run in a notebook: `run = load_run(workdir)`.

  run = concept_diffusion.load_run("runs/quickstart")
  scalars = run.encode(images)                       # (B, N): the representation
  grid = run.swap(sources, targets, token=3)         # sources with scalar 3 taken from the targets
  cells = run.traverse(image, token=3, values=np.linspace(-2, 2, 7))
  images, maps = run.attention_maps(images)          # (B, side, side, N) cross-attention per token
  record = run.generation_metrics(num_images=200)    # reconstructions and swaps read by the factor reader
  run.model, run.config, run.variables, run.ae_params, run.dataset

Images are (B, H, W, C) float arrays in [-1, 1] (dataset.images(indices) gives them); outputs are too. Sampling uses
the EMA UNet and config.sample's DDIM steps and eta unless given.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from concept_diffusion import data as data_lib
from concept_diffusion import states
from concept_diffusion.evaluation import evaluate
from concept_diffusion.models.encdiff import EncDiff, EncDiffVariables, build_model
from concept_diffusion.workdir import load_config


@dataclasses.dataclass(frozen=True)
class Run:
  config: ml_collections.ConfigDict
  workdir: str
  model: EncDiff
  variables: EncDiffVariables
  ae_params: Any  # the first stage's parameters (None in pixel space)
  step: int

  @functools.cached_property
  def dataset(self) -> data_lib.GroundTruthDataset:
    return data_lib.get_dataset(self.config.data)

  def _sampling(self, steps: Optional[int], eta: Optional[float]) -> dict[str, Any]:
    return {"steps": steps or self.config.sample.ddim_steps,
            "eta": self.config.sample.eta if eta is None else eta}

  @functools.cached_property
  def _jitted(self) -> dict[str, Any]:
    return {name: jax.jit(getattr(self.model, name)) for name in ("encode", "tokens", "encode_with_tokens")}

  def encode(self, images: Any) -> np.ndarray:
    """(B, N) scalars of images (B, H, W, C) in [-1, 1]."""
    return np.asarray(self._jitted["encode"](self.variables, jnp.asarray(images, jnp.float32)))

  def tokens(self, scalars: Any) -> np.ndarray:
    """(B, N, token_dim) tokens of (B, N) scalars."""
    return np.asarray(self._jitted["tokens"](self.variables, jnp.asarray(scalars, jnp.float32)))

  def sample(self, scalars: Any, seed: int = 0, steps: Optional[int] = None, eta: Optional[float] = None
             ) -> np.ndarray:
    """Images generated from (B, N) scalars (DDIM, EMA UNet); one `seed` gives the same noise to every call."""
    tokens = self._jitted["tokens"](self.variables, jnp.asarray(scalars, jnp.float32))
    return np.asarray(self.model.sample_jit(self.variables, self.ae_params, tokens, jax.random.PRNGKey(seed),
                                            **self._sampling(steps, eta)))

  def reconstruct(self, images: Any, seed: int = 0, steps: Optional[int] = None,
                  eta: Optional[float] = None) -> np.ndarray:
    """Images regenerated from their own tokens."""
    return self.sample(self.encode(images), seed, steps, eta)

  def swap(self, sources: Any, targets: Any, token: int | Sequence[int], seed: int = 0,
           steps: Optional[int] = None, eta: Optional[float] = None) -> np.ndarray:
    """Each source regenerated with scalar(s) `token` taken from the matching target (same noise as
    `reconstruct(sources, seed)`, so only the swapped factor should change)."""
    token_set = tuple(int(k) for k in np.atleast_1d(token))
    return np.asarray(self.model.swap_grid(self.variables, self.ae_params, jnp.asarray(sources, jnp.float32),
                                           jnp.asarray(targets, jnp.float32), jax.random.PRNGKey(seed),
                                           token_sets=(token_set,), **self._sampling(steps, eta))[0])

  def traverse(self, image: Any, token: int, values: Sequence[float], seed: int = 0,
               steps: Optional[int] = None, eta: Optional[float] = None) -> np.ndarray:
    """(V, H, W, C): one image (H, W, C) regenerated with scalar `token` set to each of `values` (each cell from
    the noise `sample(..., seed)` gives a single image)."""
    values = jnp.asarray(values, jnp.float32)[None]
    return np.asarray(self.model.traversal_grid(self.variables, self.ae_params, jnp.asarray(image, jnp.float32),
                                                values, jax.random.PRNGKey(seed), tokens=(int(token),),
                                                **self._sampling(steps, eta))[0])

  def generation_metrics(self, num_images: Optional[int] = None, seed: Optional[int] = None,
                         steps: Optional[int] = None, eta: Optional[float] = None,
                         tokens: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """The generation metrics (evaluation/generation.py) of this run, as `encdiff-evaluate --metrics=generation`
    computes them, without writing anything: reconstruction accuracy per factor, the swap matrix of `tokens`
    (default: the informative ones) and the swap score per factor."""
    config = self.config
    if seed is not None:
      config = ml_collections.ConfigDict(config.to_dict())
      config.eval.seed = seed
    return evaluate.evaluate_generation(config, self.model, self.variables, self.ae_params, self.dataset,
                                        self.workdir, self.step, num_images=num_images, steps=steps, eta=eta,
                                        tokens=tokens, write=False)

  def attention_maps(self, images: Any, side: Optional[int] = None, seed: int = 0, steps: Optional[int] = None,
                     eta: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """(reconstructions, maps (B, side, side, N)): per token, its cross-attention probability over the query grid
    of `side` (default the finest), averaged over heads, layers of that grid and sampling steps."""
    if not self.model.attention_sides():
      raise ValueError(f"unet.conditioning={self.config.unet.conditioning!r}: the UNet has no cross-attention "
                       "layers to read maps from.")
    side = side or self.model.attention_sides()[0]
    if side not in self.model.attention_sides():
      raise ValueError(f"no cross-attention layers at side {side}; sides with them: {self.model.attention_sides()}.")
    _, tokens = self._jitted["encode_with_tokens"](self.variables, jnp.asarray(images, jnp.float32))
    images, maps = self.model.sample_jit(self.variables, self.ae_params, tokens, jax.random.PRNGKey(seed),
                                         attention_side=side, **self._sampling(steps, eta))
    return np.asarray(images), np.asarray(maps)


def load_run(workdir: str, step: Optional[int] = None) -> Run:
  """The run in `workdir` at its latest diffusion checkpoint (or `step`), ready to encode and sample."""
  config = load_config(workdir)
  if config.baseline.kind:
    raise ValueError(f"{workdir} is a {config.baseline.kind} baseline run, not an EncDiff run; load_run reads "
                     "EncDiff runs (concept_diffusion.baselines.trainer restores baselines).")
  state = states.restore_diffusion_state(config, workdir, step)
  variables = EncDiffVariables(state.params, state.batch_stats, state.ema_unet, state.scale_factor)
  return Run(config=config, workdir=workdir, model=build_model(config), variables=variables,
             ae_params=states.restore_first_stage_params(config, workdir), step=int(state.step))
