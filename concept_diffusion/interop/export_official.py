r"""Exports one of our workdirs as an official EncDiff state dict (exactly the official keys and layouts).

  python -m concept_diffusion.interop.export_official --workdir=runs/shapes --output=encdiff.ckpt \
      [--step=N] [--autoencoder_output=vq.ckpt]

`--output` may end in .ckpt/.pt/.pth (torch.save of {"state_dict", "global_step"}; needs the [torch] extra),
.safetensors or .npz (no torch). The state dict loads into the official `LatentDiffusion` with
`load_state_dict(..., strict=True)` (or through its `ckpt_path`); it carries no Lightning trainer state, so it is a
weights file, not a trainer resume point. `--autoencoder_output` writes the first stage alone in the layout of an
official autoencoder checkpoint (encoder/decoder/quantize + loss.discriminator.*, no LPIPS weights).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from absl import app, flags, logging

from concept_diffusion.checkpoint import restore_checkpoint
from concept_diffusion.interop import official
from concept_diffusion.workdir import DIFFUSION_DIR, first_stage_dir, load_config
from concept_diffusion.errors import UserError


def export_workdir(workdir: str, step: Optional[int] = None) -> tuple[official.StateDict, int]:
  """Our workdir -> (official state dict, global_step). Uses the latest diffusion checkpoint unless `step`."""
  config = load_config(workdir)
  state = restore_checkpoint(os.path.join(workdir, DIFFUSION_DIR), official.abstract_diffusion_state(config), step,
                   "diffusion")
  ae_params = None
  if config.first_stage.kind != "none":
    ae_params = restore_checkpoint(first_stage_dir(config, workdir), official.abstract_first_stage_state(config), None,
                         "first-stage").ae_params
  global_step = int(state.step)
  sd = official.export_state_dict(config, params=state.params, batch_stats=state.batch_stats,
                                  ema_unet=state.ema_unet, scale_factor=state.scale_factor, step=global_step,
                                  ae_params=ae_params)
  return sd, global_step


def export_autoencoder(workdir: str) -> tuple[official.StateDict, int]:
  """Our workdir's first stage -> (official autoencoder state dict, its step)."""
  config = load_config(workdir)
  if config.first_stage.kind == "none":
    raise UserError(f"{workdir} is a pixel-space run (first_stage.kind 'none'): it has no autoencoder to export.")
  fs_state = restore_checkpoint(first_stage_dir(config, workdir), official.abstract_first_stage_state(config), None,
                      "first-stage")
  return official.export_autoencoder_state_dict(fs_state), int(fs_state.step)


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  try:
    for path in (f.output, f.autoencoder_output):
      if path:  # fail before the (slow) restore rather than after it
        official.check_suffix(path)
    sd, step = export_workdir(f.workdir, f.step)
    official.save_state_dict(f.output, sd, step)
    print(f"Wrote {f.output}: {len(sd)} tensors, global_step {step}.")
    if f.autoencoder_output:
      ae_sd, ae_step = export_autoencoder(f.workdir)
      official.save_state_dict(f.autoencoder_output, ae_sd, ae_step)
      print(f"Wrote {f.autoencoder_output}: {len(ae_sd)} tensors, global_step {ae_step}.")
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Our workdir (written by experiments/train.py or import_official).")
  flags.DEFINE_string("output", None, "Output state dict: .ckpt/.pt/.pth (needs torch), .safetensors or .npz.")
  flags.DEFINE_integer("step", None, "Diffusion checkpoint step to export (default: the latest).")
  flags.DEFINE_string("autoencoder_output", None, "Also write the first stage as an official autoencoder ckpt.")
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main)
