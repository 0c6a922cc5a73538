r"""Encodes a run's dataset with its trained encoder and computes the disentanglement metrics.

  python experiments/evaluate.py --workdir=runs/quickstart [--step=S] [--metrics=factor_vae,dci] [--from_codes]

Writes W/eval/metrics_<step>.json (merged: metrics not recomputed keep their earlier values) and
W/eval/codes_<step>.npy and prints a table. --from_codes re-scores the code table an earlier evaluation saved
(no checkpoint, no encoding pass), e.g. to add per-factor scores or another metric to a finished run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from concept_diffusion import cli  # noqa: E402

cli.add_repo_root_to_path()

from absl import flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments/train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_METRICS = flags.DEFINE_list("metrics", None, "Metrics (default: the config's eval.metrics). Known: beta_vae, "
                             "dci, mig, factor_vae, sap, modularity. 'token_reliance' alone: only that diagnostic "
                             "(EncDiff; no dataset encoding, nothing written), printed.")
_FROM_CODES = flags.DEFINE_bool("from_codes", False, "Score W/eval/codes_<step>.npy (default: the latest saved) "
                                "instead of encoding the dataset with the checkpoint's encoder.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from concept_diffusion.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from concept_diffusion.train.run import (  # pylint: disable=g-import-not-at-top
      load_dataset, restore_diffusion_state, restore_first_stage_params)
  from concept_diffusion.train.workdir import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(_WORKDIR.value)
  dataset = load_dataset(config)
  extras, source = {}, ""
  if _FROM_CODES.value:
    step, scores, extras = evaluate.evaluate_saved_codes(config, dataset, _WORKDIR.value, _STEP.value,
                                                         metrics=_METRICS.value)
    source = " (saved codes)"
  elif config.baseline.kind:  # a VAE baseline: its code table is the posterior mean
    from concept_diffusion.baselines import trainer  # pylint: disable=g-import-not-at-top
    state = trainer.restore_baseline_state(config, _WORKDIR.value, _STEP.value)
    step = int(state.step)
    scores, extras = trainer.evaluate_baseline(config, state, dataset, _WORKDIR.value, step, metrics=_METRICS.value)
  else:
    state = restore_diffusion_state(config, _WORKDIR.value, _STEP.value)
    step = int(state.step)
    ae_params = restore_first_stage_params(config, _WORKDIR.value)
    if _METRICS.value == ["token_reliance"]:  # the diagnostic alone needs no code table
      scores = evaluate.reliance_scores(config, state, dataset, ae_params)
    else:
      scores, extras = evaluate.evaluate_run(config, state, dataset, _WORKDIR.value, step, metrics=_METRICS.value,
                                             ae_params=ae_params)
  print(f"{config.data.name} step {step}{source}")
  print(evaluate.format_table(scores))
  per_factor = evaluate.format_per_factor(extras, dataset.factor_names)
  if per_factor:
    print(per_factor)


if __name__ == "__main__":
  cli.run(main)
