r"""Encodes a run's dataset with its trained encoder and computes the disentanglement metrics.

  python experiments/evaluate.py --workdir=runs/quickstart [--step=S] [--metrics=factor_vae,dci]

Writes W/eval/metrics_<step>.json and W/eval/codes_<step>.npy and prints a table.
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
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from concept_diffusion.evaluation.evaluate import evaluate_run, format_table  # pylint: disable=g-import-not-at-top
  from concept_diffusion.train.run import (  # pylint: disable=g-import-not-at-top
      load_dataset, restore_diffusion_state, restore_first_stage_params)
  from concept_diffusion.train.workdir import load_config  # pylint: disable=g-import-not-at-top
  config = load_config(_WORKDIR.value)
  if config.baseline.kind:  # a VAE baseline: its code table is the posterior mean
    from concept_diffusion.baselines import trainer  # pylint: disable=g-import-not-at-top
    state = trainer.restore_baseline_state(config, _WORKDIR.value, _STEP.value)
    scores, _ = trainer.evaluate_baseline(config, state, load_dataset(config), _WORKDIR.value, int(state.step),
                                          metrics=_METRICS.value)
  elif _METRICS.value == ["token_reliance"]:
    from concept_diffusion.evaluation.evaluate import reliance_scores  # pylint: disable=g-import-not-at-top
    state = restore_diffusion_state(config, _WORKDIR.value, _STEP.value)
    scores = reliance_scores(config, state, load_dataset(config), restore_first_stage_params(config, _WORKDIR.value))
  else:
    state = restore_diffusion_state(config, _WORKDIR.value, _STEP.value)
    scores, _ = evaluate_run(config, state, load_dataset(config), _WORKDIR.value, int(state.step),
                             metrics=_METRICS.value, ae_params=restore_first_stage_params(config, _WORKDIR.value))
  print(f"{config.data.name} step {int(state.step)}")
  print(format_table(scores))


if __name__ == "__main__":
  cli.run(main)
