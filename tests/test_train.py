"""End to end on the smoke config: both stages, the workdir contract, resume/skip and the user's errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import concept_diffusion
from concept_diffusion import data, states, visualize
from concept_diffusion.checkpoint import StageCheckpoints
from concept_diffusion.config import validate_config
from concept_diffusion.evaluation import evaluate
from concept_diffusion.models.encdiff import build_model
from concept_diffusion.train import trainer
from concept_diffusion.workdir import check_or_write_config, load_config
from configs import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What experiments/train.py hands the trainer.
HOOKS = trainer.Hooks(evaluate=evaluate.evaluation_hook, figures=visualize.figures_hook,
                      format_scores=evaluate.format_table)


def _config():
  """Smoke sizes on the 60-image tiny_blocks dataset (tests/conftest.py), evaluated during and after training."""
  config = smoke.get_config()
  config.data.name = "tiny_blocks"
  config.eval.every = 2
  config.eval.final = True
  # Generation metrics (tested on this run through encdiff-evaluate): a few pairs and a reader trained briefly.
  config.eval.generation_images = 6
  config.eval.generation_batch_size = 3
  config.eval.generation_reader_steps = 60
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke_run"))
  config = _config()
  config.eval.generation_reader_dir = str(tmp_path_factory.mktemp("readers"))
  state = trainer.train(config, workdir, HOOKS)
  return config, workdir, state


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_writes_the_workdir_contract(trained):
  config, workdir, state = trained
  assert int(state.step) == config.train.num_steps
  assert StageCheckpoints(os.path.join(workdir, "autoencoder")).latest_step() == config.first_stage.num_steps
  assert StageCheckpoints(os.path.join(workdir, "diffusion")).latest_step() == config.train.num_steps
  assert load_config(workdir).to_dict() == config.to_dict()
  records = _records(workdir)
  stages = {r["stage"] for r in records}
  assert stages == {"first_stage", "diffusion", "eval", "figures"}
  diffusion = [r for r in records if r["stage"] == "diffusion"]
  assert [r["step"] for r in diffusion] == list(range(config.train.log_every, config.train.num_steps + 1,
                                                      config.train.log_every))
  for key in ("loss", "grad_norm", "lr", "ema_decay", "steps_per_s", "images_per_s", "mfu"):
    assert np.isfinite(diffusion[-1][key])
  # The compiled step's FLOPs at the logged rate over this CPU's measured peak: a fraction, never above one.
  assert 0 < diffusion[-1]["mfu"] < 1
  assert diffusion[-1]["images_per_s"] == pytest.approx(diffusion[-1]["steps_per_s"] * config.train.batch_size)
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  for name in ("loss_curves.png", "reconstructions.png", "swap_grid.png", "attention_maps.png", "traversals.png",
               "samples.png", "dci_importance.png", "metrics.png"):
    image = np.asarray(Image.open(os.path.join(workdir, "figures", name)).convert("L"), np.float32)
    assert image.std() > 5.0, f"{name} is blank"


def test_training_evaluates_with_the_fast_subset_then_the_full_set(trained):
  config, workdir, state = trained
  eval_dir = os.path.join(workdir, "eval")
  with open(os.path.join(eval_dir, "metrics_2.json")) as f:
    during = json.load(f)
  with open(os.path.join(eval_dir, f"metrics_{config.train.num_steps}.json")) as f:
    final = json.load(f)
  diagnostic = {"token_reliance"}  # written with every EncDiff evaluation (tests/test_token_reliance.py)
  assert {k.split(".")[0] for k in during if "." in k} == set(config.eval.train_metrics) | diagnostic
  assert {k.split(".")[0] for k in final if "." in k} == set(config.eval.metrics) | diagnostic
  bands = [k for k in final if k.startswith("token_reliance.t")]
  assert len(bands) == config.eval.token_reliance_bands and np.isfinite(final["token_reliance.mean"])
  assert final["dataset"] == "tiny_blocks" and final["step"] == config.train.num_steps
  assert np.asarray(final["dci.importance_matrix"]).shape == (config.encoder.num_tokens, 3)
  for key in ("factor_vae.eval_accuracy", "dci.disentanglement", "mig.discrete_mig", "beta_vae.eval_accuracy"):
    assert 0.0 <= final[key] <= 1.0
  codes = np.load(os.path.join(eval_dir, f"codes_{config.train.num_steps}.npy"))
  assert codes.shape == (60, config.encoder.num_tokens)
  assert not os.path.exists(os.path.join(eval_dir, "codes_2.npy"))  # only the final table is kept
  eval_records = [r for r in _records(workdir) if r["stage"] == "eval"]
  assert [r["step"] for r in eval_records] == [2, config.train.num_steps]


def test_evaluate_an_earlier_checkpoint(trained):
  config, workdir, _ = trained
  state = states.restore_diffusion_state(config, workdir, step=2)
  assert int(state.step) == 2
  dataset = data.get_dataset(config.data)
  scores, _ = evaluate.evaluate_encdiff(config, build_model(config), state, dataset, workdir, 2, metrics=("mig",),
                                        progress=False)
  with open(os.path.join(workdir, "eval", "metrics_2.json")) as f:
    assert json.load(f)["mig.discrete_mig"] == scores["mig.discrete_mig"]
  with pytest.raises(FileNotFoundError, match="available steps"):
    states.restore_diffusion_state(config, workdir, step=3)


def test_evaluate_cli_can_print_only_the_token_reliance(trained, capsys):
  # In this process: the test dataset (tiny_blocks) is registered here only.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  before = sorted(os.listdir(os.path.join(workdir, "eval")))
  flags.FLAGS(["evaluate.py", f"--workdir={workdir}", "--metrics=token_reliance", "--step=2"])
  try:
    evaluate_cli._main([])  # pylint: disable=protected-access
  finally:
    flags.FLAGS.unparse_flags()
  printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
  assert len(printed) == config.eval.token_reliance_bands + 1 and "token_reliance.mean" in printed
  (during,) = [r for r in _records(workdir) if r["stage"] == "eval" and r["step"] == 2]
  # The same images, timesteps and noise as the evaluation during training.
  assert float(printed["token_reliance.mean"]) == pytest.approx(during["token_reliance.mean"], abs=1e-4)
  assert sorted(os.listdir(os.path.join(workdir, "eval"))) == before  # nothing written


def test_evaluate_cli_scores_what_the_run_generates(trained, capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import evaluate as evaluate_cli  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained
  step = config.train.num_steps
  with open(os.path.join(workdir, "eval", f"metrics_{step}.json")) as f:
    before = json.load(f)
  flags.FLAGS(["evaluate.py", f"--workdir={workdir}", "--metrics=generation", "--ddim_steps=3", "--tokens=0,2"])
  try:
    evaluate_cli._main([])  # pylint: disable=protected-access
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  with open(os.path.join(workdir, "eval", f"generation_{step}.json")) as f:
    record = json.load(f)
  assert record["generation.swap_tokens"] == [0, 2] and record["generation.num_images"] == 6
  matrix = np.asarray(record["generation.swap_matrix"])
  assert matrix.shape == (2, 3) and np.all((matrix >= 0) & (matrix <= 1))
  assert set(record["generation.reconstruction_accuracy.per_factor"]) == {"x", "y", "color"}
  assert set(record["generation.reader_accuracy"]) == {"x", "y", "color"}
  assert "generation.swap_score" in out and "reconstructed" in out  # the table and the per-factor lines
  with open(os.path.join(workdir, "eval", f"metrics_{step}.json")) as f:
    after = json.load(f)
  assert after["mig.discrete_mig"] == before["mig.discrete_mig"]  # merged, nothing lost
  assert after["generation.swap_score"] == record["generation.swap_score"]
  assert os.path.exists(os.path.join(workdir, "figures", "swap_matrix.png"))
  # load_run computes the same record (same seed and pairs) without writing.
  run = concept_diffusion.load_run(workdir)
  again = run.generation_metrics(steps=3, tokens=[0, 2])
  assert again["generation.swap_matrix"] == record["generation.swap_matrix"]


def test_load_run_gives_a_notebook_the_trained_model(trained):
  config, workdir, state = trained
  run = concept_diffusion.load_run(workdir)
  assert run.step == config.train.num_steps and run.config.to_dict() == config.to_dict()
  images = run.dataset.images(np.arange(8))
  # The same scalars the final evaluation wrote to its code table.
  codes = np.load(os.path.join(workdir, "eval", f"codes_{config.train.num_steps}.npy"))
  np.testing.assert_allclose(run.encode(images), codes[:8], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(run.variables.ema_unet["out_2"]["kernel"]),
                                np.asarray(state.ema_unet["out_2"]["kernel"]))
  # A swap from identical images, and a traversal through the image's own value, are its reconstruction.
  own = run.reconstruct(images[:2], steps=3)
  np.testing.assert_array_equal(run.swap(images[:2], images[:2], token=[0, 2], steps=3), own)
  value = run.encode(images[:1])[0, 1]
  np.testing.assert_allclose(run.traverse(images[0], token=1, values=[value], steps=3),
                             run.reconstruct(images[:1], steps=3), atol=1e-6)
  # A swap samples from the source's scalars with the chosen one taken from the target, with the same noise.
  # (Whether the image then changes is the model's business: after the smoke run's few steps the cross-attention's
  # zero-initialised output projection is still so small that the change can round away in float32.)
  codes = run.encode(images[:4])
  mixed = codes[:2].copy()
  mixed[:, 1] = codes[2:4, 1]
  np.testing.assert_allclose(run.swap(images[:2], images[2:4], token=1, seed=5, steps=3),
                             run.sample(mixed, seed=5, steps=3), atol=1e-5)
  recon, maps = run.attention_maps(images[:2], steps=3)
  side = run.model.attention_sides()[0]
  assert maps.shape == (2, side, side, config.encoder.num_tokens) and recon.shape == images[:2].shape
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="no cross-attention layers at side 3"):
    run.attention_maps(images[:2], side=3, steps=3)


def test_zero_steps_evaluates_the_untrained_model(tmp_path):
  """train.num_steps=0 scores the initialisation: the reference row of experiments/reproduce.py."""
  config = _config()
  config.stages, config.first_stage.kind = ("diffusion",), "none"
  config.train.num_steps, config.sample.final_figures = 0, False
  config.eval.metrics = ("mig",)
  state = trainer.train(config, str(tmp_path), HOOKS)
  assert int(state.step) == 0
  with open(tmp_path / "eval" / "metrics_0.json") as f:
    scores = json.load(f)
  assert 0.0 <= scores["mig.discrete_mig"] <= 1.0
  assert all(scores[k] == 0.0 for k in scores if k.startswith("token_reliance."))  # zero-initialised outputs
  (record,) = _records(str(tmp_path))
  # At the origin of the metric-vs-time curves (experiments/reproduce.py plots eval records that have a clock).
  assert record["stage"] == "eval" and record["wall_s"] == 0.0 and record["images_seen"] == 0


def test_state_holds_scale_factor_ema_and_batch_stats(trained):
  config, _, state = trained
  assert 0.0 < float(state.scale_factor) < 1e3 and float(state.scale_factor) != 1.0
  # The EMA lags the raw UNet after a few steps; the encoder has no EMA copy.
  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 state.ema_unet, state.params["unet"])
  assert max(jax.tree_util.tree_leaves(diffs)) > 0
  assert jax.tree_util.tree_structure(state.ema_unet) == jax.tree_util.tree_structure(state.params["unet"])
  assert "batch_stats" not in state.params["encoder"] and state.batch_stats


def test_rerun_skips_finished_stages_and_extends_an_unfinished_one(trained):
  config, workdir, state = trained
  before = len(_records(workdir))
  again = trainer.train(config, workdir, HOOKS)
  assert len(_records(workdir)) == before  # nothing retrained
  np.testing.assert_array_equal(np.asarray(again.scale_factor), np.asarray(state.scale_factor))
  longer = _config()
  longer.train.num_steps = config.train.num_steps + 2  # num_steps may change between invocations
  extended = trainer.train(longer, workdir, HOOKS)
  assert int(extended.step) == config.train.num_steps + 2
  new = _records(workdir)[before:]
  assert [r["stage"] for r in new] == ["diffusion", "eval", "figures"]
  assert new[0]["step"] == config.train.num_steps + 2


def test_unknown_config_field_is_named():
  config = smoke.get_config()
  config.train.bach_size = 3
  with pytest.raises(ValueError, match="train.bach_size.*train.batch_size"):
    validate_config(config)


def test_bad_timestep_sampling_is_named():
  config = smoke.get_config()
  config.diffusion.timestep_sampling = "beta"
  validate_config(config)  # a name the code defines: checked by build_model, before any work
  with pytest.raises(ValueError, match="diffusion.timestep_sampling='beta'; it must be one of"):
    build_model(config)
  config.diffusion.timestep_sampling, config.diffusion.timestep_logit_std = "logit_normal", 0.0
  with pytest.raises(ValueError, match="timestep_logit_std=0.0; it must be > 0"):
    validate_config(config)


def _console_script(name):
  return os.path.join(os.path.dirname(sys.executable), name)


def test_unknown_override_on_the_command_line_is_one_clear_line(tmp_path):
  # The installed console script, from a directory outside the repository, with the config given by name.
  proc = subprocess.run([_console_script("encdiff-train"), "--config=smoke", f"--workdir={tmp_path / 'w'}",
                         "--config.train.bach_size=3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: unknown config field" in proc.stderr and "batch_size" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w")  # refused before anything was written


def test_an_unknown_config_name_lists_the_packaged_configs(tmp_path):
  proc = subprocess.run([_console_script("encdiff-train"), "--config=smok", f"--workdir={tmp_path / 'w'}"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "--config=smok" in proc.stderr and "quickstart" in proc.stderr and "smoke" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_config_names_resolve_to_packaged_files_and_paths_pass_through(tmp_path):
  from concept_diffusion.tools import cli  # pylint: disable=g-import-not-at-top
  resolved = cli.resolve_config_names(["prog", "--config=smoke", "--config.seed=3", "--other=smoke"])
  assert resolved[1] == f"--config={os.path.join(cli.packaged_configs_dir(), 'smoke.py')}"
  assert os.path.isfile(resolved[1].split("=", 1)[1]) and resolved[2:] == ["--config.seed=3", "--other=smoke"]
  assert cli.resolve_config_names(["prog", "--config", "smoke"])[2].endswith(os.path.join("configs", "smoke.py"))
  here = tmp_path / "mine.py"
  here.write_text("")
  for value in ("configs/smoke.py", str(here), "configs/smoke.py:arg"):
    assert cli.resolve_config_names(["prog", f"--config={value}"])[1] == f"--config={value}"


def test_wrong_image_shape_is_rejected():
  config = smoke.get_config()
  config.data.channels = 1
  with pytest.raises(ValueError, match="channels"):
    data.get_dataset(config.data)


def test_workdir_with_a_different_config_is_refused(tmp_path):
  check_or_write_config(smoke.get_config(), str(tmp_path))
  other = smoke.get_config()
  other.train.lr = 1.0
  with pytest.raises(ValueError, match=r"train\.lr"):
    check_or_write_config(other, str(tmp_path))
  resumable = smoke.get_config()
  resumable.train.num_steps = 99
  check_or_write_config(resumable, str(tmp_path))  # extending a run is allowed


def test_missing_first_stage_checkpoint_is_explained(tmp_path):
  config = smoke.get_config()
  config.stages = ("diffusion",)
  with pytest.raises(FileNotFoundError, match="first-stage checkpoint"):
    trainer.train(config, str(tmp_path), HOOKS)
