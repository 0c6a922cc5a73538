"""W/config.json: written by the first training on a workdir, compared with the config of every later one, and read
back by everything that takes only the workdir (evaluate, visualize, load_run)."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from concept_diffusion import config as config_lib
from concept_diffusion.errors import UserError
from concept_diffusion.workdir.layout import CONFIG_FILE, ensure_workdir
from concept_diffusion.workdir.storage import exists, read_text, write_json


def check_or_write_config(config: ml_collections.ConfigDict, workdir: str, write: bool = True) -> None:
  """Refuses a workdir whose config.json describes a different run; writes config.json otherwise."""
  ensure_workdir(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if exists(path):
    saved = _read_config_json(path)
    diffs = config_lib.differing_fields(config, saved)
    if diffs:
      lines = "\n".join(f"  {k}: workdir has {old!r}, this run has {new!r}" for k, old, new in diffs[:20])
      raise UserError(
          f"The workdir {workdir} holds a run with a different config:\n{lines}\n"
          "Use a new --workdir, or pass the workdir's values (see its config.json) to resume it.")
  if write:
    write_json(path, config_lib.config_to_dict(config), indent=2, sort_keys=True)


def _read_config_json(path: str) -> dict[str, Any]:
  def invalid(reason: str) -> UserError:
    return UserError(f"{path} is not a valid run config ({reason}). Restore it from a copy, or write it again: run "
                     "encdiff-train with the run's --config on this --workdir.")
  try:
    saved = json.loads(read_text(path))
  except ValueError as e:
    raise invalid(f"{type(e).__name__}: {e}") from None
  if not isinstance(saved, dict):
    raise invalid(f"a JSON {type(saved).__name__}, not an object")
  # Its extensions add fields to the schema: one that cannot be imported is named as such, not as a bad file.
  config_lib.import_modules(saved.get("extensions", ()))
  try:
    config_lib.config_from_dict(saved)  # every field it names must be in the schema
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise invalid(f"{type(e).__name__}: {e}") from None
  return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from its config.json (for evaluate/visualize/load_run, which take only the workdir); imports
  the extensions it names, so their registered models can be built."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a workdir written by encdiff-train?")
  return config_lib.config_from_dict(_read_config_json(path))
