"""Config validation and the workdir contract (config.json beside the checkpoints)."""
from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any

import ml_collections

from concept_diffusion import defaults
from concept_diffusion.diffusion import SCHEDULES, TIMESTEP_SAMPLINGS
from concept_diffusion.models.kernels import ATTENTION_IMPLS, CONV_IMPLS

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


# An evaluation at step S writes W/eval/metrics_S.json (its scores) and W/eval/codes_S.npy (the code table they
# were computed from); every reader and writer of those names goes through these two functions.
EVAL_FILE_SUFFIXES = {"metrics": ".json", "codes": ".npy"}


def eval_path(workdir: str, kind: str, step: int) -> str:
  """W/eval/metrics_<step>.json (kind "metrics") or W/eval/codes_<step>.npy (kind "codes")."""
  return os.path.join(workdir, "eval", f"{kind}_{int(step)}{EVAL_FILE_SUFFIXES[kind]}")


def eval_steps(workdir: str, kind: str) -> list[int]:
  """Steps with an evaluation file of this kind in W/eval, ascending."""
  eval_dir = os.path.join(workdir, "eval")
  names = os.listdir(eval_dir) if os.path.isdir(eval_dir) else []
  pattern = re.compile(rf"{kind}_(\d+){re.escape(EVAL_FILE_SUFFIXES[kind])}")
  return sorted(int(m.group(1)) for m in map(pattern.fullmatch, names) if m)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, (dict, ml_collections.ConfigDict)):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def validate_config(config: ml_collections.ConfigDict) -> None:
  """One clear ValueError for a field the schema does not know or a value no code path accepts."""
  known = _flatten(config_to_dict(defaults.get_base_config()))
  for key in _flatten(config_to_dict(config)):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"Unknown config field {key!r}.{hint} The schema is concept_diffusion/defaults.py.")
  checks = [
      (config.first_stage.kind in ("vq", "kl", "none"), "first_stage.kind must be 'vq', 'kl' or 'none'"),
      (config.diffusion.beta_schedule in SCHEDULES, f"diffusion.beta_schedule must be one of {SCHEDULES}"),
      (config.diffusion.loss in ("l1", "l2"), "diffusion.loss must be 'l1' or 'l2'"),
      (config.diffusion.get("objective", "eps") in ("eps", "one_shot"),
       "diffusion.objective must be 'eps' or 'one_shot'"),
      (config.diffusion.get("timestep_sampling", "uniform") in TIMESTEP_SAMPLINGS,
       f"diffusion.timestep_sampling must be one of {TIMESTEP_SAMPLINGS}"),
      (config.diffusion.get("timestep_logit_std", 1.0) > 0, "diffusion.timestep_logit_std must be > 0"),
      (config.eval.get("token_reliance_images", 0) >= 0 and config.eval.get("token_reliance_bands", 5) >= 1,
       "eval.token_reliance_images must be >= 0 (0 = off) and eval.token_reliance_bands >= 1"),
      (config.train.compute_dtype in ("float32", "bfloat16"), "train.compute_dtype must be float32 or bfloat16"),
      (config.train.on_nonfinite in ("stop", "skip"), "train.on_nonfinite must be 'stop' or 'skip'"),
      (set(config.stages) <= {"first_stage", "diffusion"} and len(config.stages) > 0,
       "stages must be a non-empty subset of ('first_stage', 'diffusion')"),
      (config.train.batch_size > 0 and config.first_stage.batch_size > 0, "batch sizes must be positive"),
      (config.encoder.num_tokens > 0 and config.encoder.token_dim > 0, "encoder.num_tokens/token_dim must be > 0"),
      (config.unet.conditioning in ("cross_attention", "adagn"), "unet.conditioning must be 'cross_attention' or "
       "'adagn'"),
      (config.unet.conv_impl in CONV_IMPLS, f"unet.conv_impl must be one of {CONV_IMPLS}"),
      (config.unet.attention_impl in ATTENTION_IMPLS, f"unet.attention_impl must be one of {ATTENTION_IMPLS}"),
      (config.baseline.kind in ("", "beta_vae", "beta_tcvae"), "baseline.kind must be '', 'beta_vae' or "
       "'beta_tcvae'"),
      (config.baseline.batch_size > 0 and config.baseline.latent_dim > 0 and config.baseline.beta >= 0,
       "baseline.batch_size and baseline.latent_dim must be > 0 and baseline.beta >= 0"),
      # The disentanglement_lib encoder halves the image four times and its decoder doubles it back.
      (not config.baseline.kind or config.data.image_size % 16 == 0,
       "a baseline needs data.image_size divisible by 16 (four stride-2 convolutions)"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"Invalid config: {message}.")
  for section, groups, widths in (("unet", config.unet.norm_groups, [config.unet.model_channels * m
                                                                      for m in config.unet.channel_mult]),
                                  ("first_stage", config.first_stage.norm_groups,
                                   [config.first_stage.ch * m for m in config.first_stage.ch_mult])):
    bad = [w for w in widths if w % groups]
    if bad:
      raise ValueError(f"Invalid config: {section}.norm_groups={groups} does not divide channel widths {bad}.")
  for mult in config.unet.channel_mult:
    if (mult * config.unet.model_channels) % config.unet.num_heads:
      raise ValueError(f"Invalid config: unet.num_heads={config.unet.num_heads} does not divide "
                       f"{mult * config.unet.model_channels} channels.")


def computation_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """A hashable config with the resumable fields reset to their defaults.

  Jitted functions take it as a static argument, so extending a run (more steps, other log cadence)
  in the same process reuses their compiled code instead of compiling again.
  """
  base = _flatten(config_to_dict(defaults.get_base_config()))
  frozen = ml_collections.ConfigDict(config_to_dict(config))
  for key in base:
    if _is_resumable(key) and not key.startswith(("sample.", "eval.")):
      section, _, field = key.rpartition(".")
      target = frozen[section] if section else frozen
      target[field] = tuple(base[key]) if isinstance(base[key], list) else base[key]
  return ml_collections.FrozenConfigDict(frozen)


def _is_resumable(key: str) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUMABLE_FIELDS)


def check_or_write_config(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> None:
  """Refuses a workdir whose config.json describes a different run; writes config.json otherwise."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = config_to_dict(config)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    # A field added to the schema after the run started counts as its default, so old workdirs still resume.
    new, old = _flatten(current), {**_flatten(config_to_dict(defaults.get_base_config())), **_flatten(saved)}
    diffs = sorted(k for k in set(new) | set(old) if not _is_resumable(k) and new.get(k) != old.get(k))
    if diffs:
      lines = "\n".join(f"  {k}: workdir has {old.get(k)!r}, this run has {new.get(k)!r}" for k in diffs[:20])
      raise ValueError(
          f"The workdir {workdir} holds a run with a different config:\n{lines}\n"
          "Use a new --workdir, or pass the workdir's values (see its config.json) to resume it.")
  if write:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from its config.json (for evaluate/visualize, which take only --workdir)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a workdir written by experiments/train.py?")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  config = defaults.get_base_config()
  _update(config, saved)
  return config


def _update(config: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict):
      _update(config[key], value)
    else:
      config[key] = tuple(value) if isinstance(value, list) else value
