r"""Encodes a run's dataset with its trained encoder and computes the disentanglement metrics.

  encdiff-evaluate --workdir=runs/quickstart [--step=S] [--metrics=factor_vae,dci] [--from_codes]
  encdiff-evaluate --workdir=runs/quickstart --metrics=generation [--num_images=1000] [--ddim_steps=50] [--eta=1]

Writes W/eval/metrics_<step>.json (merged: metrics not recomputed keep their earlier values) and
W/eval/codes_<step>.npy and prints a table. --from_codes re-scores the code table an earlier evaluation saved
(no checkpoint, no encoding pass), e.g. to add per-factor scores or another metric to a finished run.
--metrics=generation scores what the run generates (reconstructions and token swaps read by the dataset's factor
reader; W/eval/generation_<step>.json and W/figures/swap_matrix.png).
"""
from absl import flags, logging

from concept_diffusion import api, data, visualize
from concept_diffusion.baselines import trainer as baseline_trainer
from concept_diffusion.evaluation import evaluate
from concept_diffusion.evaluation import generation as generation_lib
from concept_diffusion.tools import cli
from concept_diffusion.workdir import figure_path, load_config

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by encdiff-train.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_METRICS = flags.DEFINE_list("metrics", None, "Metrics (default: the config's eval.metrics). Known: beta_vae, "
                             "dci, mig, factor_vae, sap, modularity; generation (EncDiff: reconstructions and swaps read "
                             "by the factor reader). 'token_reliance' alone: only that diagnostic "
                             "(EncDiff; no dataset encoding, nothing written), printed.")
_FROM_CODES = flags.DEFINE_bool("from_codes", False, "Score W/eval/codes_<step>.npy (default: the latest saved) "
                                "instead of encoding the dataset with the checkpoint's encoder.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Generation metrics: source/target pairs (default: the "
                                   "config's eval.generation_images, 1,000).")
_DDIM_STEPS = flags.DEFINE_integer("ddim_steps", None, "Generation metrics: DDIM steps (default: "
                                   "eval.generation_ddim_steps, else sample.ddim_steps).")
_ETA = flags.DEFINE_float("eta", None, "Generation metrics: DDIM eta (default: sample.eta).")
_TOKENS = flags.DEFINE_list("tokens", None, "Generation metrics: tokens to swap (default: the informative ones).")
flags.mark_flags_as_required(["workdir"])


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  config = load_config(workdir)
  dataset = data.get_dataset(config.data)
  extras, source = {}, ""
  if _FROM_CODES.value:
    step, scores, extras = evaluate.evaluate_saved_codes(config, dataset, workdir, _STEP.value,
                                                         metrics=_METRICS.value)
    source = " (saved codes)"
  elif config.baseline.kind:  # a VAE baseline: its code table is the posterior mean
    state = baseline_trainer.restore_baseline_state(config, workdir, _STEP.value)
    step = int(state.step)
    scores, extras = baseline_trainer.evaluate_baseline(config, state, dataset, workdir, step,
                                                        metrics=_METRICS.value)
  else:
    run = api.load_run(workdir, _STEP.value)
    step = run.step
    if _METRICS.value == ["token_reliance"]:  # the diagnostic alone needs no code table
      scores = evaluate.reliance_scores(config, run.model, run.variables, dataset, run.ae_params)
    elif _METRICS.value == [evaluate.GENERATION]:  # no code table either: it samples
      record = evaluate.evaluate_generation(
          config, run.model, run.variables, run.ae_params, dataset, workdir, step, num_images=_NUM_IMAGES.value,
          steps=_DDIM_STEPS.value, eta=_ETA.value, tokens=[int(k) for k in _TOKENS.value] if _TOKENS.value else None)
      scores = generation_lib.headline_scores(record)
      visualize.plot_swap_matrix(record, figure_path(workdir, "swap_matrix.png"))
    else:
      scores, extras = evaluate.evaluate_encdiff(config, run.model, run.variables, dataset, workdir, step,
                                                 metrics=_METRICS.value, ae_params=run.ae_params)
  print(f"{config.data.name} step {step}{source}")
  print(evaluate.format_table(scores))
  per_factor = evaluate.describe_step(workdir, step) if extras or evaluate.GENERATION in (_METRICS.value or ()) else ""
  if per_factor:
    print(per_factor)


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
