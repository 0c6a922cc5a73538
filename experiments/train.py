r"""Trains every stage the config lists (first stage, then concept diffusion) into --workdir.

  encdiff-train --config=quickstart --workdir=runs/quickstart [--config.train.batch_size=64]
  (or: python experiments/train.py --config=configs/quickstart.py --workdir=...)

Running the same command again resumes an unfinished stage and skips a finished one. On SIGTERM (or a TPU
preemption notice) the run saves at the next step and exits 0, on Ctrl-C it saves and exits 130; run the command
again to continue. A second training on the same workdir is refused while the first runs (W/lock.json).
With config.baseline.kind set (configs/baseline_vae.py, configs/baseline_tcvae.py) it trains that VAE baseline
instead, with the same workdir layout, resume and evaluation. Multi-host: the same command on every host
(docs/scaling.md).
"""
from absl import flags, logging
from ml_collections import config_flags

from concept_diffusion import parallel, visualize
from concept_diffusion.baselines.trainer import train_baseline
from concept_diffusion.evaluation import evaluate
from concept_diffusion.tools import cli
from concept_diffusion.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config: a name in configs/ or a .py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local) for checkpoints, logs and figures.")
flags.mark_flags_as_required(["config", "workdir"])

# Evaluation and figures, handed to the trainer (it imports neither).
HOOKS = trainer.Hooks(evaluate=evaluate.evaluation_hook, figures=visualize.figures_hook,
                      format_scores=evaluate.format_table, describe=evaluate.describe_hook)


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; progress goes to the bar instead
  config = _CONFIG.value
  # Before any other JAX call: multi-process start-up must precede backend initialisation.
  parallel.maybe_initialize_distributed(config.distributed)
  cli.enable_compilation_cache()  # a restart loads the compiled steps instead of compiling them again
  if config.baseline.kind:  # a VAE baseline (configs/baseline_*.py) instead of EncDiff
    train_baseline(config, _WORKDIR.value)
  else:
    trainer.train(config, _WORKDIR.value, HOOKS)


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
