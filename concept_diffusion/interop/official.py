"""Key mapping between our parameter trees and the official EncDiff (PyTorch Lightning) state dict.

The official layout is the one of github.com/ThomasMrY/EncDiff as mirrored at commit `596a29d` of
github.com/SelenaGeRuiqi/EncDiff (`LatentDiffusion` from `ldm/models/diffusion/ddpm_enc.py`, UNet and `Encoder4`
from `ldm/modules/diffusionmodules/openaimodel_enc.py`, `VQModelInterface` first stage):

  model.diffusion_model.*   UNet                       -> params["unet"]
  model_ema.diffusion_model<key without dots>          -> ema_unet   (LitEma buffers)
  cond_stage_model.encoder.* / .net.*                  -> params["encoder"] (+ BatchNorm running stats -> batch_stats)
  first_stage_model.*       VQ autoencoder             -> FirstStageState.ae_params
  scale_factor                                         -> DiffusionState.scale_factor

Our module names mirror the official ones with '.' -> '_' (`input_blocks_4_0/in_layers_2` is
`input_blocks.4.0.in_layers.2`), so the mapping is *derived from our own parameter trees*: every leaf of the
abstract model yields its official key, PyTorch shape and layout conversion. The official key list is therefore
generated, not hand-written, and one table drives import, export and validation alike.

Layouts: Conv2d weight OIHW <-> kernel HWIO, Linear weight (out, in) <-> kernel (in, out), norm weight <-> scale,
BatchNorm running_mean/var <-> batch_stats mean/var, the per-token MLPs (N separate `nn.Sequential`s) <-> our
stacked (N, in, out) kernels.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import pickle
import re
from typing import Any, Iterable, Mapping, Optional

from absl import logging
import flax.traverse_util
import jax
import ml_collections
import numpy as np

from concept_diffusion import states
from concept_diffusion.diffusion.schedule import SCHEDULES, make_beta_schedule
from concept_diffusion.models import autoencoder
from concept_diffusion.workdir import atomic_path, exists, is_remote, local_copy
from concept_diffusion.errors import UserError

OFFICIAL_COMMIT = "596a29d"  # github.com/SelenaGeRuiqi/EncDiff mirror of the official code's first commit
OFFICIAL_REPO = "github.com/ThomasMrY/EncDiff"

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
ENCODER_PREFIX = "cond_stage_model."
FIRST_STAGE_PREFIX = "first_stage_model."
DISCRIMINATOR_PREFIX = "loss.discriminator."  # inside a standalone autoencoder checkpoint
SCALE_FACTOR_KEY = "scale_factor"
# LitEma bookkeeping: the decay is a config value and the update count equals the step, so neither is imported.
EMA_DECAY_KEY = "model_ema.decay"
EMA_NUM_UPDATES_KEY = "model_ema.num_updates"
# Buffers DDPM.register_schedule stores (ddpm_enc.py; `lvlb_weights` is non-persistent). All derive from `betas`,
# which import checks against the config's schedule; we recompute them, so they are otherwise ignored.
DIFFUSION_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
    "posterior_mean_coef2",
)
NUM_BATCHES_TRACKED = "num_batches_tracked"

# How many names an error message lists per category before summarising.
_MAX_LISTED = 25

StateDict = dict[str, np.ndarray]


class StateDictMismatchError(ValueError):
  """The state dict and the model built from the config disagree; lists every offending key."""

  def __init__(self, what: str, missing: list[str], unexpected: list[str],
               wrong_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]], hint: str = ""):
    self.missing, self.unexpected, self.wrong_shapes = missing, unexpected, wrong_shapes
    lines = [f"{what} does not match the model built from the config (official EncDiff layout, commit "
             f"{OFFICIAL_COMMIT}):"]
    if missing:
      lines.append(f"  {len(missing)} missing key(s) (the model needs them, the state dict lacks them): "
                   + _listing(missing))
    if unexpected:
      lines.append(f"  {len(unexpected)} unexpected key(s) (in the state dict, used by nothing): "
                   + _listing(unexpected))
    if wrong_shapes:
      shown = [f"{k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in wrong_shapes[:_MAX_LISTED]]
      more = f"; ... and {len(wrong_shapes) - _MAX_LISTED} more" if len(wrong_shapes) > _MAX_LISTED else ""
      lines.append(f"  {len(wrong_shapes)} wrong shape(s) (PyTorch layout): " + "; ".join(shown) + more)
    lines.append(hint or "Check that --config describes the architecture the checkpoint was trained with "
                         "(unet.*, encoder.*, first_stage.*, data.channels).")
    super().__init__("\n".join(lines))


def _listing(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------------------------------------------
# Name and layout rules.

_MID_RE = re.compile(r"^mid_(block|attn)_(\d+)$")  # taming's `mid.block_1` / `mid.attn_1` keep their underscore
_INDEX_RE = re.compile(r"_(?=\d)|(?<=\d)_")  # every '_' that touches a list index is a '.' in PyTorch
_STACKED_RE = re.compile(r"^net_(\d+)_(kernel|bias)$")  # ConceptEncoder's stacked token MLPs


def torch_module_name(name: str) -> str:
  """One of our module names -> its PyTorch attribute path: `input_blocks_4_0` -> `input_blocks.4.0`.

  Only underscores next to a list index become dots, so `skip_connection`, `proj_in`, `to_q` and `nin_shortcut`
  stay as they are; taming's `mid.block_1` is the one official name whose underscore touches a digit.
  """
  mid = _MID_RE.match(name)
  if mid:
    return f"mid.{mid.group(1)}_{mid.group(2)}"
  return _INDEX_RE.sub(".", name)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One official tensor and where it lives in our trees.

  Attributes:
    key: the official state-dict key.
    tree: which of our trees holds it ('unet', 'ema', 'encoder', 'batch_stats', 'first_stage', 'disc',
      'disc_batch_stats').
    path: the leaf's path in that tree.
    kind: layout conversion, 'conv' (HWIO <-> OIHW), 'linear' ((in, out) <-> (out, in)) or 'copy'.
    shape: the PyTorch shape.
    index: for a stacked leaf (the token MLPs), which row of it this tensor is.
  """
  key: str
  tree: str
  path: tuple[str, ...]
  kind: str
  shape: tuple[int, ...]
  index: Optional[int] = None


def to_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.asarray(order="C", a=np.transpose(x, (3, 2, 0, 1)))
  if kind == "linear":
    return np.asarray(order="C", a=x.T)
  return np.asarray(order="C", a=x)


def from_torch_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.asarray(order="C", a=np.transpose(x, (2, 3, 1, 0)))
  if kind == "linear":
    return np.asarray(order="C", a=x.T)
  return np.asarray(order="C", a=x)


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "linear":
    return (shape[1], shape[0])
  return tuple(shape)


def _leaf_rule(leaf: str, ndim: int, where: str) -> tuple[str, str]:
  """Our leaf name and rank -> (PyTorch attribute, layout kind)."""
  if leaf == "kernel":
    if ndim == 4:
      return "weight", "conv"
    if ndim == 2:
      return "weight", "linear"
  elif leaf == "scale":
    return "weight", "copy"
  elif leaf == "bias":
    return "bias", "copy"
  elif leaf == "mean":
    return "running_mean", "copy"
  elif leaf == "var":
    return "running_var", "copy"
  elif leaf == "embedding":
    return "embedding.weight", "copy"
  # A new kind of parameter in our models: the mapping has to learn it, silently guessing would corrupt weights.
  raise NotImplementedError(f"No official counterpart known for parameter {where!r} (leaf {leaf!r}, rank {ndim}).")


def tree_entries(tree: Any, tree_name: str, prefix: str, *, ema_style: bool = False) -> list[Entry]:
  """Entries for every leaf of one of our (abstract or concrete) parameter trees.

  Args:
    tree: nested dict of arrays or ShapeDtypeStructs.
    tree_name: the name stored in each Entry's `tree`.
    prefix: prepended to the dotted PyTorch name (e.g. 'model.diffusion_model.').
    ema_style: LitEma naming: the dotted name with every '.' removed, appended to `prefix`.

  Returns:
    The entries in the tree's leaf order.
  """
  entries = []
  for path, leaf in flax.traverse_util.flatten_dict(tree).items():
    shape = tuple(leaf.shape)
    where = "/".join(path)
    stacked = _STACKED_RE.match(path[-1]) if len(path) == 1 else None
    if stacked:
      layer, what = int(stacked.group(1)), stacked.group(2)
      kind = "linear" if what == "kernel" else "copy"
      for k in range(shape[0]):
        name = f"net.{k}.{layer}.{'weight' if what == 'kernel' else 'bias'}"
        entries.append(Entry(prefix + name, tree_name, path, kind, _torch_shape(kind, shape[1:]), index=k))
      continue
    attr, kind = _leaf_rule(path[-1], len(shape), where)
    name = ".".join([torch_module_name(p) for p in path[:-1]] + [attr])
    key = prefix + name.replace(".", "") if ema_style else prefix + name
    entries.append(Entry(key, tree_name, path, kind, _torch_shape(kind, shape)))
  return entries


def entries_to_state_dict(entries: Iterable[Entry], trees: Mapping[str, Any]) -> StateDict:
  """Our trees -> official tensors (numpy, PyTorch layouts), one per entry."""
  flat = {name: flax.traverse_util.flatten_dict(tree) for name, tree in trees.items()}
  out = {}
  for e in entries:
    value = np.asarray(flat[e.tree][e.path])
    if e.index is not None:
      value = value[e.index]
    out[e.key] = to_torch_layout(e.kind, value)
  return out


def state_dict_to_trees(entries: Iterable[Entry], state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Official tensors -> our trees (nested dicts of float32 numpy arrays). Keys and shapes must be checked first."""
  flat: dict[str, dict[tuple[str, ...], Any]] = {}
  stacked: dict[tuple[str, tuple[str, ...]], dict[int, np.ndarray]] = {}
  for e in entries:
    value = from_torch_layout(e.kind, np.asarray(state_dict[e.key], dtype=np.float32))
    if e.index is None:
      flat.setdefault(e.tree, {})[e.path] = value
    else:
      stacked.setdefault((e.tree, e.path), {})[e.index] = value
  for (tree, path), rows in stacked.items():
    flat.setdefault(tree, {})[path] = np.stack([rows[k] for k in range(len(rows))])
  return {name: flax.traverse_util.unflatten_dict(leaves) for name, leaves in flat.items()}


def check_keys(what: str, state_dict: Mapping[str, Any], entries: list[Entry], ignored: Iterable[str] = (),
               hint: str = "") -> None:
  """Raises StateDictMismatchError unless the state dict holds exactly the entries' keys (plus `ignored` ones)
  with the entries' shapes."""
  expected = {e.key: e.shape for e in entries}
  ignored = set(ignored)
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected and k not in ignored]
  wrong = [(k, expected[k], tuple(np.shape(state_dict[k]))) for k in expected
           if k in state_dict and tuple(np.shape(state_dict[k])) != expected[k]]
  if missing or unexpected or wrong:
    raise StateDictMismatchError(what, missing, unexpected, wrong, hint)


def _duplicate_keys(entries: list[Entry]) -> list[str]:
  seen, dups = set(), []
  for e in entries:
    if e.key in seen:
      dups.append(e.key)
    seen.add(e.key)
  return dups


# ----------------------------------------------------------------------------------------------------------------
# The layout of a whole checkpoint, derived from the config.

@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
  """All official tensors of a LatentDiffusion checkpoint built from one of our configs."""
  unet: list[Entry]
  ema: list[Entry]
  encoder: list[Entry]  # params and batch stats
  first_stage: list[Entry]  # empty for first_stage.kind == 'none'
  num_batches_tracked: list[str]  # one per encoder BatchNorm
  timesteps: int

  @property
  def entries(self) -> list[Entry]:
    return self.unet + self.ema + self.encoder + self.first_stage

  def official_keys(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every key of the official `LatentDiffusion.state_dict()`, with shape and dtype, in our order."""
    keys = {e.key: (e.shape, "float32") for e in self.unet + self.encoder}
    keys.update({k: ((), "int64") for k in self.num_batches_tracked})
    keys.update({e.key: (e.shape, "float32") for e in self.first_stage})
    keys.update({e.key: (e.shape, "float32") for e in self.ema})
    keys[EMA_DECAY_KEY] = ((), "float32")
    keys[EMA_NUM_UPDATES_KEY] = ((), "int32")
    keys[SCALE_FACTOR_KEY] = ((), "float32")
    keys.update({k: ((self.timesteps,), "float32") for k in DIFFUSION_BUFFERS})
    return keys


def _cached_by_config(fn):
  """Memoises a pure function of the config on the config's JSON.

  Tracing the models for their abstract trees costs seconds; import, export and their tests ask for the same
  config's trees several times. The results are trees of immutable ShapeDtypeStructs, so sharing them is safe.
  """
  cache: dict[str, Any] = {}

  @functools.wraps(fn)
  def wrapper(config: ml_collections.ConfigDict):
    key = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    if key not in cache:
      cache[key] = fn(config)
    return cache[key]
  return wrapper


@_cached_by_config
def abstract_diffusion_state(config: ml_collections.ConfigDict):
  """DiffusionState of ShapeDtypeStructs for `config` (no parameter is materialised)."""
  model, tx, _ = states.build_diffusion(config)
  return states.abstract_state(model, tx)


@_cached_by_config
def abstract_first_stage_state(config: ml_collections.ConfigDict):
  """FirstStageState of ShapeDtypeStructs for `config`; None in pixel space (first_stage.kind 'none')."""
  if config.first_stage.kind == "none":
    return None
  return states.abstract_first_stage_state(config)


@_cached_by_config
def abstract_ae_params(config: ml_collections.ConfigDict) -> Any:
  """The first stage's parameters as ShapeDtypeStructs; None in pixel space."""
  if config.first_stage.kind == "none":
    return None
  module = autoencoder.build_first_stage(config.first_stage, config.data.channels)
  return autoencoder.abstract_params(module, config.data.image_size, config.data.channels)


def checkpoint_layout(config: ml_collections.ConfigDict, diffusion_state: Any = None,
                      ae_params: Any = None) -> CheckpointLayout:
  """The official layout for `config` (abstract trees are built from the config when not given)."""
  state = diffusion_state if diffusion_state is not None else abstract_diffusion_state(config)
  if ae_params is None and config.first_stage.kind != "none":
    ae_params = abstract_ae_params(config)
  return layout_from_trees(params=state.params, ema_unet=state.ema_unet, batch_stats=state.batch_stats,
                           ae_params=ae_params, timesteps=int(config.diffusion.timesteps))


def layout_from_trees(*, params: Mapping[str, Any], ema_unet: Any, batch_stats: Any, ae_params: Any,
                      timesteps: int) -> CheckpointLayout:
  """The official layout of the given trees (concrete or abstract; only their structure and shapes matter)."""
  unet = tree_entries(params["unet"], "unet", UNET_PREFIX)
  ema = tree_entries(ema_unet, "ema", EMA_PREFIX + "diffusion_model", ema_style=True)
  encoder = (tree_entries(params["encoder"], "encoder", ENCODER_PREFIX)
             + tree_entries(batch_stats, "batch_stats", ENCODER_PREFIX))
  first = [] if ae_params is None else tree_entries(ae_params, "first_stage", FIRST_STAGE_PREFIX)
  dups = _duplicate_keys(unet + ema + encoder + first)
  if dups:  # LitEma's dot removal can in principle merge two names (input_blocks.1.1.x vs input_blocks.11.x)
    raise UserError(f"Official key collision for this architecture (LitEma drops dots): {_listing(dups)}.")
  nbt = [e.key[:-len("running_mean")] + NUM_BATCHES_TRACKED for e in encoder if e.key.endswith("running_mean")]
  return CheckpointLayout(unet, ema, encoder, first, nbt, timesteps)


def official_keys(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], str]]:
  """Key -> (PyTorch shape, dtype) of the official checkpoint's state_dict for `config`, generated from our models."""
  return checkpoint_layout(config).official_keys()


def autoencoder_entries(first_stage_state: Any) -> tuple[list[Entry], list[Entry]]:
  """(autoencoder, discriminator) entries in the layout of a standalone official autoencoder checkpoint."""
  ae = tree_entries(first_stage_state.ae_params, "first_stage", "")
  disc = (tree_entries(first_stage_state.disc_params, "disc", DISCRIMINATOR_PREFIX)
          + tree_entries(first_stage_state.disc_batch_stats, "disc_batch_stats", DISCRIMINATOR_PREFIX))
  return ae, disc


# ----------------------------------------------------------------------------------------------------------------
# Schedule check.

def check_betas(betas: np.ndarray, diffusion_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless the checkpoint's `betas` buffer equals the config's schedule.

  A model trained with one noise schedule and sampled with another silently produces garbage, so this is an
  error rather than a warning. The message names a schedule kind that does match when there is one.
  """
  betas = np.asarray(betas, dtype=np.float64).reshape(-1)
  d = diffusion_config
  ours = make_beta_schedule(d.beta_schedule, d.timesteps, d.linear_start, d.linear_end, d.cosine_s)
  if betas.shape == ours.shape and np.allclose(betas, ours.astype(np.float32), rtol=1e-5, atol=1e-9):
    return
  described = (f"diffusion.beta_schedule={d.beta_schedule!r}, timesteps={d.timesteps}, "
               f"linear_start={d.linear_start}, linear_end={d.linear_end}")
  hint = ""
  for kind in SCHEDULES:
    other = make_beta_schedule(kind, betas.shape[0], d.linear_start, d.linear_end, d.cosine_s)
    if np.allclose(betas, other.astype(np.float32), rtol=1e-5, atol=1e-9):
      hint = f" The checkpoint's betas match beta_schedule={kind!r} with timesteps={betas.shape[0]}."
      break
  raise UserError(
      f"The checkpoint was trained with a different noise schedule: its `betas` buffer ({betas.shape[0]} steps, "
      f"from {betas[0]:.6g} to {betas[-1]:.6g}) differs from the config's ({described}: {ours.shape[0]} steps, "
      f"from {ours[0]:.6g} to {ours[-1]:.6g}).{hint} Set the config's diffusion.* fields to the checkpoint's.")


def diffusion_buffers(diffusion_config: ml_collections.ConfigDict) -> StateDict:
  """The schedule buffers DDPM.register_schedule stores, computed as it does (float64, stored as float32)."""
  d = diffusion_config
  betas = make_beta_schedule(d.beta_schedule, d.timesteps, d.linear_start, d.linear_end, d.cosine_s)
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  ac_next = np.append(ac[1:], ac[-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # v_posterior = 0 in every official config
  with np.errstate(divide="ignore"):
    values = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev, "alphas_cumprod_next": ac_next,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
  return {k: values[k].astype(np.float32) for k in DIFFUSION_BUFFERS}


# ----------------------------------------------------------------------------------------------------------------
# Import.

@dataclasses.dataclass
class ImportedWeights:
  """Everything an official checkpoint carries that our states hold, in our layouts (numpy float32)."""
  params: dict[str, Any]  # {"encoder": ..., "unet": ...}
  batch_stats: Any
  ema_unet: Any
  scale_factor: np.ndarray
  ae_params: Any = None  # None in pixel space
  disc_params: Any = None  # only from a standalone autoencoder checkpoint whose discriminator matches ours
  disc_batch_stats: Any = None
  ema_num_updates: Optional[int] = None


def import_state_dict(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, *,
                      autoencoder_state_dict: Optional[Mapping[str, np.ndarray]] = None,
                      ema_from_params: bool = False, scale_factor: Optional[float] = None,
                      layout: Optional[CheckpointLayout] = None) -> ImportedWeights:
  """An official LatentDiffusion state dict (numpy values) -> our parameters, EMA, batch stats, scale_factor.

  Args:
    state_dict: the checkpoint's `state_dict` (keys as in the official code, PyTorch layouts).
    config: our config; it must describe the checkpoint's architecture and schedule.
    autoencoder_state_dict: a standalone official autoencoder checkpoint's state dict (keys without the
      `first_stage_model.` prefix, plus `loss.*`). Used for the first stage instead of (or, when both are present,
      checked against) the `first_stage_model.*` entries of `state_dict`; its `loss.discriminator.*` weights are
      taken when they fit our discriminator.
    ema_from_params: initialise the EMA from the raw UNet weights when the checkpoint has no `model_ema.*` (a
      checkpoint trained with use_ema=False, or one trimmed of it). Without it, missing EMA weights are an error.
    scale_factor: use this instead of the checkpoint's `scale_factor` buffer (needed when the official run had
      scale_by_std=False, which keeps scale_factor out of the state dict).
    layout: checkpoint_layout(config), when the caller already has it (building it traces the models).

  Returns:
    The weights in our layouts.

  Raises:
    StateDictMismatchError: a missing, unexpected or wrongly shaped key (every one is listed).
    ValueError: the checkpoint's `betas` disagree with the config's schedule, or first stages disagree.
  """
  layout = layout if layout is not None else checkpoint_layout(config)
  sd = dict(state_dict)
  if SCALE_FACTOR_KEY in sd and np.size(sd[SCALE_FACTOR_KEY]) == 1:
    # 0-d normally; (1,) when the official run re-registered it as torch.Tensor([1]) (no first stage).
    sd[SCALE_FACTOR_KEY] = np.asarray(sd[SCALE_FACTOR_KEY]).reshape(())
  fs_from_main = any(k.startswith(FIRST_STAGE_PREFIX) for k in sd)
  use_separate_ae = autoencoder_state_dict is not None
  has_ema = any(k.startswith(EMA_PREFIX) and k not in (EMA_DECAY_KEY, EMA_NUM_UPDATES_KEY) for k in sd)

  required = layout.unet + layout.encoder
  if has_ema or not ema_from_params:
    required = required + layout.ema
  if not use_separate_ae or fs_from_main:
    required = required + layout.first_stage
  ignored = set(DIFFUSION_BUFFERS) | set(layout.num_batches_tracked) | {EMA_DECAY_KEY, EMA_NUM_UPDATES_KEY}
  if scale_factor is None:
    required = required + [Entry(SCALE_FACTOR_KEY, "", (), "copy", ())]
  else:
    ignored.add(SCALE_FACTOR_KEY)

  hint = ""
  if not has_ema and not ema_from_params:
    hint = ("The checkpoint has no EMA weights (model_ema.*); pass --ema_from_params to start the EMA from the raw "
            "UNet weights. ")
  if layout.first_stage and not fs_from_main and not use_separate_ae:
    hint += ("The checkpoint has no first_stage_model.* weights; pass the autoencoder's own checkpoint with "
             "--autoencoder_ckpt. ")
  if SCALE_FACTOR_KEY not in sd and scale_factor is None:
    hint += "The checkpoint has no scale_factor buffer (official scale_by_std=False); pass --scale_factor. "
  hint += ("Check that --config describes the architecture the checkpoint was trained with (unet.*, encoder.*, "
           "first_stage.*, data.channels).")
  check_keys("The checkpoint's state dict", sd, required, ignored, hint)

  if "betas" in sd:
    check_betas(np.asarray(sd["betas"]), config.diffusion)
  else:  # a trimmed checkpoint: nothing to compare with
    logging.warning("The checkpoint has no `betas` buffer: its noise schedule cannot be checked against the config.")

  entries = layout.unet + layout.encoder + (layout.ema if has_ema else [])
  trees = state_dict_to_trees(entries, sd)
  params = {"encoder": trees["encoder"], "unet": trees["unet"]}
  if has_ema:
    ema_unet = trees["ema"]
  else:
    logging.warning("No model_ema.* in the checkpoint: the EMA starts from the raw UNet weights.")
    ema_unet = jax.tree_util.tree_map(np.copy, trees["unet"])
  scale = np.asarray(sd[SCALE_FACTOR_KEY] if scale_factor is None else scale_factor, np.float32).reshape(())

  num_updates = None
  if EMA_NUM_UPDATES_KEY in sd:
    num_updates = int(np.asarray(sd[EMA_NUM_UPDATES_KEY]).reshape(()))

  ae_params = disc_params = disc_bs = None
  if layout.first_stage:
    if fs_from_main:
      ae_params = state_dict_to_trees(layout.first_stage, sd)["first_stage"]
    if use_separate_ae:
      separate, disc_params, disc_bs = _import_autoencoder(autoencoder_state_dict, config)
      if ae_params is not None:
        _check_same_first_stage(ae_params, separate)
      ae_params = separate
  elif use_separate_ae:
    raise UserError("--autoencoder_ckpt was given, but config.first_stage.kind is 'none' (pixel-space diffusion).")

  return ImportedWeights(params=params, batch_stats=trees["batch_stats"], ema_unet=ema_unet, scale_factor=scale,
                         ae_params=ae_params, disc_params=disc_params, disc_batch_stats=disc_bs,
                         ema_num_updates=num_updates)


def _import_autoencoder(state_dict: Mapping[str, np.ndarray],
                        config: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
  """A standalone official autoencoder state dict -> (ae_params, disc_params or None, disc_batch_stats or None)."""
  fs_state = abstract_first_stage_state(config)
  ae_entries, disc_entries = autoencoder_entries(fs_state)
  sd = dict(state_dict)
  if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd):  # a LatentDiffusion checkpoint passed by mistake
    sd = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PREFIX)}
  # LPIPS (loss.perceptual_loss.*), the KL loss's logvar and other loss buffers are training-only; ignored.
  loss_keys = [k for k in sd if k.startswith("loss.")]
  check_keys("The autoencoder checkpoint's state dict", sd, ae_entries, ignored=loss_keys)
  ae_params = state_dict_to_trees(ae_entries, sd)["first_stage"]

  disc_sd = {k: v for k, v in sd.items() if k.startswith(DISCRIMINATOR_PREFIX)
             and not k.endswith("." + NUM_BATCHES_TRACKED)}
  if not disc_sd:
    logging.info("The autoencoder checkpoint has no loss.discriminator.*: the discriminator starts fresh.")
    return ae_params, None, None
  try:
    check_keys("The autoencoder checkpoint's discriminator", disc_sd, disc_entries)
  except StateDictMismatchError as e:
    # The discriminator only matters for further first-stage training, which the import marks as finished.
    logging.warning("The checkpoint's discriminator does not fit ours (config.first_stage.disc_*); it starts "
                    "fresh instead.\n%s", e)
    return ae_params, None, None
  trees = state_dict_to_trees(disc_entries, disc_sd)
  return ae_params, trees["disc"], trees["disc_batch_stats"]


def _check_same_first_stage(from_main: Any, from_separate: Any) -> None:
  a = flax.traverse_util.flatten_dict(from_main)
  b = flax.traverse_util.flatten_dict(from_separate)
  differing = ["/".join(p) for p in a if not np.array_equal(a[p], b[p])]
  if differing:
    raise UserError(
        "The checkpoint's first_stage_model.* weights differ from those in --autoencoder_ckpt (e.g. "
        f"{_listing(differing)}): the diffusion model was trained on another autoencoder. Drop "
        "--autoencoder_ckpt to use the checkpoint's own, or pass the matching autoencoder.")


# ----------------------------------------------------------------------------------------------------------------
# Export.

def export_state_dict(config: ml_collections.ConfigDict, *, params: Mapping[str, Any], batch_stats: Any,
                      ema_unet: Any, scale_factor: Any, step: int, ae_params: Any = None) -> StateDict:
  """Our weights -> a state dict with exactly the official LatentDiffusion keys, shapes and dtypes.

  Buffers the official module registers are filled as it would: the schedule from the config, the LitEma decay
  from train.ema_decay and its update count (and each BatchNorm's num_batches_tracked) from the step, since both
  count one per training step in the official code.
  """
  if config.first_stage.kind != "none" and ae_params is None:
    raise UserError("Exporting a latent-diffusion checkpoint needs the first stage's parameters (ae_params).")
  layout = layout_from_trees(params=params, ema_unet=ema_unet, batch_stats=batch_stats,
                             ae_params=ae_params if config.first_stage.kind != "none" else None,
                             timesteps=int(config.diffusion.timesteps))
  trees = {"unet": params["unet"], "ema": ema_unet, "encoder": params["encoder"], "batch_stats": batch_stats}
  if layout.first_stage:
    trees["first_stage"] = ae_params
  sd = entries_to_state_dict(layout.entries, trees)
  sd.update({k: np.asarray(step, np.int64) for k in layout.num_batches_tracked})
  sd[EMA_DECAY_KEY] = np.asarray(config.train.ema_decay, np.float32)
  sd[EMA_NUM_UPDATES_KEY] = np.asarray(step, np.int32)
  sd[SCALE_FACTOR_KEY] = np.asarray(scale_factor, np.float32).reshape(())
  sd.update(diffusion_buffers(config.diffusion))
  order = layout.official_keys()
  return {k: sd[k] for k in order}


def export_autoencoder_state_dict(first_stage_state: Any) -> StateDict:
  """A FirstStageState -> the state dict of a standalone official autoencoder checkpoint (no LPIPS weights:
  the official loss loads those from its own VGG/LPIPS files)."""
  ae_entries, disc_entries = autoencoder_entries(first_stage_state)
  sd = entries_to_state_dict(ae_entries + disc_entries, {
      "first_stage": first_stage_state.ae_params, "disc": first_stage_state.disc_params,
      "disc_batch_stats": first_stage_state.disc_batch_stats})
  step = int(np.asarray(first_stage_state.step))
  for e in disc_entries:
    if e.key.endswith("running_mean"):
      sd[e.key[:-len("running_mean")] + NUM_BATCHES_TRACKED] = np.asarray(step, np.int64)
  return sd


# ----------------------------------------------------------------------------------------------------------------
# Files: Lightning .ckpt (torch pickle), .safetensors, .npz.

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SUPPORTED_SUFFIXES = TORCH_SUFFIXES + (".safetensors", ".npz")
# In an .npz we write, the step travels as this extra array (it is no official key, so it cannot collide).
NPZ_STEP_KEY = "global_step"


@dataclasses.dataclass
class LoadedCheckpoint:
  state_dict: StateDict
  global_step: Optional[int] = None
  epoch: Optional[int] = None


def check_suffix(path: str) -> str:
  """The file's supported suffix, or a ValueError listing the supported ones."""
  lower = path.lower()
  for suffix in SUPPORTED_SUFFIXES:
    if lower.endswith(suffix):
      return suffix
  raise UserError(f"Unsupported checkpoint file {path!r}: use one of {', '.join(SUPPORTED_SUFFIXES)} "
                   "(.ckpt/.pt/.pth/.bin are torch pickles and need the [torch] extra).")


def import_torch(purpose: str):
  """`torch`, or an ImportError that says how to get it and how to do without it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"{purpose} needs PyTorch, an optional dependency of concept-diffusion: pip install "
        "'concept-diffusion[torch]' (a CPU build is enough). Without torch, use a .safetensors or .npz state dict "
        "(convert on a machine with torch: python -m concept_diffusion.interop.export_official --help shows the "
        "formats).") from e
  return torch


def _torch_to_numpy(torch, value: Any, key: str) -> np.ndarray:
  if not isinstance(value, torch.Tensor):
    raise UserError(f"State-dict entry {key!r} is a {type(value).__name__}, not a tensor.")
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:  # numpy has no bfloat16
    value = value.float()
  return value.numpy()


class _Inert:
  """Stands in for any class or function a checkpoint's pickle names outside its tensors (Lightning keeps e.g.
  OmegaConf lists in the LR scheduler's state). It accepts whatever unpickling does to it and runs no code of the
  original, whose package need not even be installed."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values


# What a torch.save'd state dict needs beyond storages (which torch resolves itself): the same few names
# torch.load(weights_only=True) allows. Everything else unpickles as _Inert.
_TORCH_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "device"), ("torch", "Size"),
}


class _InertUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _TORCH_PICKLE_GLOBALS:
      return super().find_class(module, name)
    if module == "torch":
      import torch  # pylint: disable=g-import-not-at-top
      if isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return _Inert


def _inert_pickle_module():
  """A pickle-module stand-in for torch.load(pickle_module=...) that reads tensors and neutralises the rest."""
  import types  # pylint: disable=g-import-not-at-top
  module = types.ModuleType("concept_diffusion_inert_pickle")
  module.Unpickler = _InertUnpickler
  module.load = lambda f, **kwargs: _InertUnpickler(f, **kwargs).load()
  module.__dict__["UnpicklingError"] = pickle.UnpicklingError
  return module


def load_state_dict(path: str, *, trust_pickle: bool = False) -> LoadedCheckpoint:
  """Reads a state dict (Lightning checkpoint, bare torch state dict, .safetensors or .npz) as numpy arrays.

  Args:
    path: the file.
    trust_pickle: let torch unpickle arbitrary objects. Lightning checkpoints are pickles; by default they are
      read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers and so
      cannot run code hidden in a file. Official checkpoints also hold other objects (the LR scheduler's OmegaConf
      settings, callback states); those are then read with every such class replaced by an inert placeholder, which
      is as safe and needs none of their packages. `trust_pickle` unpickles them for real instead (their packages
      must be installed); it is never needed for the state dict itself.

  Returns:
    The state dict and, when the file records them, global_step and epoch.
  """
  if is_remote(path):  # the readers below need a local file name
    if not exists(path):
      raise FileNotFoundError(f"Checkpoint file {path!r} not found.")
    with local_copy(path) as local:
      try:
        return load_state_dict(local, trust_pickle=trust_pickle)
      except ValueError as e:
        raise UserError(str(e).replace(local, path)) from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint file {path!r} not found.")
  suffix = check_suffix(path)
  if suffix == ".safetensors":
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    try:
      sd = safetensors.numpy.load_file(path)
      with safetensors.safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files or bf16
      raise UserError(f"Could not read {path!r} as safetensors: {e}") from e
    step = meta.get("global_step")
    return LoadedCheckpoint(dict(sd), int(step) if step is not None else None)
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        sd = {k: data[k] for k in data.files}
    except Exception as e:  # zipfile / numpy format errors
      raise UserError(f"Could not read {path!r} as an .npz state dict: {e}") from e
    step = sd.pop(NPZ_STEP_KEY, None)
    return LoadedCheckpoint(sd, int(step) if step is not None else None)

  torch = import_torch(f"Reading {path!r} (a PyTorch pickle)")
  try:
    if trust_pickle:
      obj = torch.load(path, map_location="cpu", weights_only=False)
    else:
      try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
      except pickle.UnpicklingError:
        logging.info("%s holds objects other than tensors; reading it with those replaced by placeholders.", path)
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle_module())
  except Exception as e:  # truncated or foreign files, or (trust_pickle) a class whose package is missing
    raise UserError(f"Could not read {path!r} with torch.load: {type(e).__name__}: {e}") from e
  if not isinstance(obj, Mapping):
    raise UserError(f"{path!r} holds a {type(obj).__name__}, not a Lightning checkpoint or a state dict.")
  if "state_dict" in obj:
    raw = obj["state_dict"]
  elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    raw = obj  # a bare state dict
  else:
    raise UserError(f"{path!r} is neither a Lightning checkpoint (no 'state_dict' entry; it has "
                     f"{sorted(obj)[:10]}) nor a bare state dict of tensors.")
  sd = {k: _torch_to_numpy(torch, v, k) for k, v in raw.items()}
  step, epoch = obj.get("global_step"), obj.get("epoch")
  return LoadedCheckpoint(sd, int(step) if step is not None else None, int(epoch) if epoch is not None else None)


def save_state_dict(path: str, state_dict: Mapping[str, np.ndarray], global_step: int) -> None:
  """Writes a state dict: `.ckpt`/`.pt`/`.pth` as torch.save({'state_dict', 'global_step'}) (needs torch),
  `.safetensors` with the step in its metadata, `.npz` with the step as an extra `global_step` array."""
  suffix = check_suffix(path)
  arrays = {k: np.asarray(order="C", a=v) for k, v in state_dict.items()}
  if suffix == ".npz" and NPZ_STEP_KEY in arrays:
    raise UserError(f"State dict already has a {NPZ_STEP_KEY!r} entry; it is reserved in .npz files.")
  torch = import_torch(f"Writing {path!r} (a PyTorch checkpoint)") if suffix not in (".safetensors", ".npz") else None
  with atomic_path(path) as tmp:  # an interrupted export never leaves a truncated file under the real name
    if suffix == ".safetensors":
      import safetensors.numpy  # pylint: disable=g-import-not-at-top
      safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt", "global_step": str(int(global_step))})
    elif suffix == ".npz":
      with open(tmp, "wb") as f:  # a file object keeps numpy from appending a second .npz
        np.savez(f, **arrays, **{NPZ_STEP_KEY: np.asarray(int(global_step), np.int64)})
    else:
      tensors = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in arrays.items())
      torch.save({"state_dict": tensors, "global_step": int(global_step)}, tmp)
