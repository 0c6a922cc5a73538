"""experiments/reproduce.py: the planned runs, skipping finished ones, the summary tables and the curves figure."""
import dataclasses
import json
import os
import sys

import pytest
from PIL import Image

from experiments import reproduce

EXPECTED = {
    "encdiff_seed0": ("configs/repro_cpu.py", ["--config.seed=0"]),
    "encdiff_seed1": ("configs/repro_cpu.py", ["--config.seed=1"]),
    "encdiff_seed2": ("configs/repro_cpu.py", ["--config.seed=2"]),
    "beta_vae_seed0": ("configs/baseline_vae.py", ["--config.seed=0"]),
    "beta_vae_seed1": ("configs/baseline_vae.py", ["--config.seed=1"]),
    "beta_vae_seed2": ("configs/baseline_vae.py", ["--config.seed=2"]),
    "beta_tcvae_seed0": ("configs/baseline_tcvae.py", ["--config.seed=0"]),
    "beta_tcvae_seed1": ("configs/baseline_tcvae.py", ["--config.seed=1"]),
    "beta_tcvae_seed2": ("configs/baseline_tcvae.py", ["--config.seed=2"]),
    "ablation_tokens5": ("configs/repro_cpu.py", ["--config.seed=0", "--config.encoder.num_tokens=5"]),
    "ablation_tokens10": ("configs/repro_cpu.py", ["--config.seed=0", "--config.encoder.num_tokens=10"]),
    "ablation_adagn": ("configs/repro_cpu.py", ["--config.seed=0", "--config.unet.conditioning=adagn"]),
    "ablation_no_diffusion": ("configs/repro_cpu.py", ["--config.seed=0", "--config.diffusion.objective=one_shot"]),
    "untrained_encoder": ("configs/repro_cpu.py", ["--config.seed=0", "--config.train.num_steps=0",
                                                   "--config.sample.final_figures=False"]),
    "ablation_uniform_t": ("configs/repro_cpu.py",
                           ["--config.seed=0", "--config.diffusion.timestep_sampling=uniform"]),
}


def _fake_finished_run(workdir, baseline_kind="", steps=20, value=0.5):
  """What train.py leaves behind, reduced to what reproduce.py reads."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  config = {"data": {"name": "procedural_shapes"}, "train": {"num_steps": steps},
            "baseline": {"kind": baseline_kind, "num_steps": steps}}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "eval", f"metrics_{steps}.json"), "w") as f:
    json.dump({"step": steps, "dataset": "procedural_shapes", "factor_vae.eval_accuracy": value,
               "dci.disentanglement": value / 2}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in (steps // 2, steps):
      f.write(json.dumps({"stage": "eval", "step": step, "factor_vae.eval_accuracy": value * step / steps,
                          "wall_s": 3.0 * step, "images_seen": 32 * step}) + "\n")


def test_dry_run_lists_every_run_once(tmp_path, capsys):
  assert reproduce.main(["--dry_run", f"--root={tmp_path}", "--table=cpu"]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[would run]")]
  assert len(lines) == len(EXPECTED)
  for line in lines:
    workdir = next(arg for arg in line.split() if arg.startswith("--workdir="))
    name = os.path.basename(workdir)
    config, overrides = EXPECTED[name]
    assert f"--config={config}" in line.split() and line.split()[-len(overrides):] == overrides
    assert line.split()[3].endswith(os.path.join("experiments", "train.py"))
  assert "encdiff_seed0" in lines[0] and "beta_tcvae_seed0" in lines[2]  # seed 0 of every model first
  assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_finished_runs_are_skipped_and_unknown_names_refused(tmp_path, capsys):
  _fake_finished_run(str(tmp_path / "encdiff_seed0"))
  assert reproduce.main(["--dry_run", f"--root={tmp_path}", "--table=cpu", "--only=encdiff_seed0,beta_vae_seed0"]) == 0
  out = capsys.readouterr().out
  assert "[done] encdiff_seed0" in out and "beta_vae_seed0" in out and "encdiff_seed1" not in out
  assert reproduce.main(["--dry_run", f"--root={tmp_path}", "--only=encdiff_seed9"]) == 2


def test_runs_then_writes_tables_and_curves(tmp_path, monkeypatch):
  calls = []

  def fake_train(command, cwd):
    del cwd
    workdir = next(arg for arg in command if arg.startswith("--workdir=")).split("=", 1)[1]
    kind = {"baseline_vae.py": "beta_vae", "baseline_tcvae.py": "beta_tcvae"}.get(
        os.path.basename(next(arg for arg in command if arg.startswith("--config="))), "")
    calls.append(os.path.basename(workdir))
    _fake_finished_run(workdir, kind, value=0.9 if not kind else 0.6)
    return 0

  monkeypatch.setattr(reproduce.subprocess, "Popen", _fake_popen(fake_train))
  assert reproduce.main([f"--root={tmp_path}", "--table=cpu"]) == 0
  assert sorted(calls) == sorted(EXPECTED)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["models"]["EncDiff"]["n_runs"] == 3 and summary["not_finished"] == []
  assert summary["models"]["beta-VAE"]["metrics"]["factor_vae.eval_accuracy"]["mean"] == pytest.approx(0.6)
  assert set(summary["ablations"]) == {"5 tokens, cross-attention", "10 tokens, cross-attention",
                                       "20 tokens, cross-attention, logit-normal t", "20 tokens, AdaGN",
                                       "20 tokens, w/o diffusion (one-shot decoder)",
                                       "20 tokens, uniform t (the paper's sampling)",
                                       "reference: the same encoder untrained (0 steps)"}
  text = (tmp_path / "summary.md").read_text()
  assert "EncDiff (n=3)" in text and "beta-TCVAE (n=3)" in text and "## EncDiff ablations" in text
  # each EncDiff seed (ablations aside) read against the reference curve: 0.9 / 0.45 after a minute of training,
  # above 0.62 / 0.13 and 0.78 / 0.31 but below the 35-minute DCI of 0.48
  assert set(summary["against_reference"]) == {"encdiff_seed0", "encdiff_seed1", "encdiff_seed2"}
  for points in summary["against_reference"].values():
    assert [p["ahead"] for p in points] == [True, True, False] and {p["step"] for p in points} == {20}
  assert "## EncDiff against the reference curve" in text
  assert Image.open(tmp_path / "curves.png").size[0] > 500
  calls.clear()
  assert reproduce.main([f"--root={tmp_path}", "--table=cpu"]) == 0  # everything finished: nothing runs again
  assert not calls


def test_fast_table_runs_the_vaes_later_seeds_at_the_learning_rate_that_won(tmp_path, monkeypatch, capsys):
  assert reproduce.main(["--dry_run", f"--root={tmp_path}"]) == 0  # --table=fast is the default
  out = capsys.readouterr().out
  planned = [line.split() for line in out.splitlines() if line.startswith("[would run]")]
  names = [os.path.basename(next(a for a in line if a.startswith("--workdir="))) for line in planned]
  assert names == ["encdiff_seed0", "beta_vae_lr1e-4_seed0", "beta_vae_lr3e-4_seed0", "beta_vae_lr1e-3_seed0",
                   "beta_tcvae_lr1e-4_seed0", "beta_tcvae_lr3e-4_seed0", "beta_tcvae_lr1e-3_seed0",
                   "untrained_encoder", "encdiff_seed1", "encdiff_seed2"]
  assert "--config=configs/repro_fast.py" in planned[0]
  assert {"--config.data.supersample=4", "--config.baseline.lr=3e-4"} <= set(planned[2])  # the VAEs' data = EncDiff's
  assert "[then] the VAEs' seeds 1 and 2" in out

  winner = {"beta_vae": "3e-4", "beta_tcvae": "1e-3"}
  commands = {}

  def fake_train(command, cwd):
    del cwd
    workdir = next(arg for arg in command if arg.startswith("--workdir=")).split("=", 1)[1]
    name = os.path.basename(workdir)
    commands[name] = command
    prefix = name.split("_lr")[0].split("_seed")[0]
    kind = prefix if prefix in winner else ""
    lr = next((a.split("=")[1] for a in command if a.startswith("--config.baseline.lr=")), "")
    _fake_finished_run(workdir, kind, value=0.8 if lr == winner.get(prefix) else 0.5)
    return 0

  monkeypatch.setattr(reproduce.subprocess, "Popen", _fake_popen(fake_train))
  assert reproduce.main([f"--root={tmp_path}"]) == 0
  assert len(commands) == 14
  assert "--config.baseline.lr=3e-4" in commands["beta_vae_seed2"]
  assert "--config.baseline.lr=1e-3" in commands["beta_tcvae_seed1"]
  summary = json.loads((tmp_path / "summary.json").read_text())
  for group in ("EncDiff", "beta-VAE", "beta-TCVAE"):
    assert summary["models"][group]["n_runs"] == 3
  assert summary["models"]["beta-VAE"]["metrics"]["factor_vae.eval_accuracy"]["mean"] == pytest.approx(0.8)
  assert "beta-VAE, lr 1e-4 (seed 0)" in summary["ablations"]  # the default learning rate stays in the record
  assert reproduce.best_learning_rate(str(tmp_path), "beta_vae") == "3e-4"


def test_finished_encdiff_runs_get_dci_on_their_saved_code_tables_for_the_curves(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "encdiff_seed0"
  _fake_finished_run(str(workdir), steps=12800)
  for step in (1600, 3200, 12800):  # the evaluations at 4800 and 6400 saved no codes
    (workdir / "eval" / f"codes_{step}.npy").write_bytes(b"")
  (workdir / "eval" / "metrics_1600.json").write_text(json.dumps({"factor_vae.eval_accuracy": 0.6}))
  (workdir / "eval" / "metrics_3200.json").write_text(json.dumps({"dci.disentanglement": 0.4}))  # already scored
  assert reproduce.main([f"--root={tmp_path}", "--only=encdiff_seed0", "--dry_run"]) == 0
  assert "--from_codes --step=1600 --metrics=dci" in capsys.readouterr().out
  commands = []

  def fake_evaluate(command, cwd):
    commands.append(command)
    step = int(next(a for a in command if a.startswith("--step=")).split("=")[1])
    path = workdir / "eval" / f"metrics_{step}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dci.disentanglement": 0.5}))
    return 0

  monkeypatch.setattr(reproduce.subprocess, "Popen", _fake_popen(fake_evaluate))
  assert reproduce.main([f"--root={tmp_path}", "--only=encdiff_seed0"]) == 0
  assert len(commands) == 1 and commands[0][1].endswith(os.path.join("experiments", "evaluate.py"))
  assert {f"--workdir={workdir}", "--from_codes", "--step=1600", "--metrics=dci"} <= set(commands[0])
  assert json.loads((workdir / "eval" / "metrics_1600.json").read_text()) == {
      "factor_vae.eval_accuracy": 0.6, "dci.disentanglement": 0.5}
  assert reproduce.main([f"--root={tmp_path}", "--only=encdiff_seed0"]) == 0 and len(commands) == 1  # all done
  (tmp_path / "encdiff_seed1" / "eval").mkdir(parents=True)  # unfinished: its codes wait for the run to end
  (tmp_path / "encdiff_seed1" / "eval" / "codes_1600.npy").write_bytes(b"")
  assert reproduce.planned_scores(reproduce.planned_runs(root=str(tmp_path)), str(tmp_path)) == []


def test_a_run_that_exits_without_its_final_evaluation_is_reported(tmp_path, monkeypatch):
  # e.g. preempted: exit 0, not done
  monkeypatch.setattr(reproduce.subprocess, "Popen", _fake_popen(lambda command, cwd: 0))
  assert reproduce.main([f"--root={tmp_path}", "--table=cpu", "--only=ablation_adagn"]) == 1
  assert "ablation_adagn" in json.loads((tmp_path / "summary.json").read_text())["not_finished"]


def _fake_popen(train):
  """A Popen stand-in that runs `train(command, cwd)` at once and reports its return value as the exit code."""
  class FakePopen:
    def __init__(self, command, cwd, **kwargs):
      del kwargs
      self.code = train(command, cwd)

    def poll(self):
      return self.code
  return FakePopen


@dataclasses.dataclass(frozen=True)
class _ScriptRun:
  """A stand-in for reproduce.Run whose command is a short Python script instead of train.py."""
  name: str
  finish: bool = True

  def command(self, root, nice=0):
    del nice
    workdir = os.path.join(root, self.name)
    script = (
        "import json, os, sys, time\n"
        f"workdir = {workdir!r}\n"
        "os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)\n"
        "time.sleep(0.5)\n"  # overlap with the other run, so both slots are busy at once
        "json.dump({'cores': sorted(os.sched_getaffinity(0)), 'xla_flags': os.environ.get('XLA_FLAGS', '')},"
        " open(os.path.join(workdir, 'seen.json'), 'w'))\n"
        "json.dump({'train': {'num_steps': 1}}, open(os.path.join(workdir, 'config.json'), 'w'))\n"
        f"if {self.finish}: open(os.path.join(workdir, 'eval', 'metrics_1.json'), 'w').write('{{}}')\n"
    )
    return [sys.executable, "-c", script]

  def done(self, root):
    return reproduce.is_finished(os.path.join(root, self.name))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux and two cores")
def test_parallel_runs_are_pinned_to_distinct_cores_single_threaded(tmp_path):
  runs = [_ScriptRun("a"), _ScriptRun("b"), _ScriptRun("c", finish=False)]
  failed = reproduce.run_all(runs, str(tmp_path), parallel=2, poll_s=0.05)
  assert failed == ["c"]
  seen = {run.name: json.loads((tmp_path / run.name / "seen.json").read_text()) for run in runs}
  assert all(len(s["cores"]) == 1 for s in seen.values())
  assert seen["a"]["cores"] != seen["b"]["cores"]  # a and b ran at the same time, one per core
  assert all("intra_op_parallelism_threads=1" in s["xla_flags"] for s in seen.values())
  with pytest.raises(ValueError, match="--parallel=99"):
    reproduce.run_all(runs, str(tmp_path), parallel=99)


def test_curves_take_metrics_scored_later_from_the_steps_eval_file(tmp_path):
  workdir = tmp_path / "encdiff_seed0"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"stage": "eval", "step": 8, "factor_vae.eval_accuracy": 0.7, "wall_s": 60.0, "images_seen": 256},
      {"stage": "eval", "step": 16, "factor_vae.eval_accuracy": 0.8, "wall_s": 120.0, "images_seen": 512}]) + "\n")
  # DCI added to step 8 afterwards from its saved code table (encdiff-evaluate --from_codes --step=8)
  (workdir / "eval" / "metrics_8.json").write_text(json.dumps(
      {"step": 8, "factor_vae.eval_accuracy": 0.7, "dci.disentanglement": 0.31, "factor_names": ["a"]}))
  curves = reproduce.eval_curves(str(workdir))
  assert [c.get("dci.disentanglement") for c in curves] == [0.31, None]
  assert curves[0]["wall_s"] == 60.0 and curves[1]["factor_vae.eval_accuracy"] == 0.8


def test_summary_only_reports_unfinished_runs_with_their_latest_evaluation(tmp_path, monkeypatch):
  popen = reproduce.subprocess.Popen

  def must_not_train(command, *args, **kwargs):  # other commands pass (matplotlib's first import runs fc-list)
    if any("train.py" in str(part) for part in command):
      raise AssertionError("--summary_only must not start a run")
    return popen(command, *args, **kwargs)
  monkeypatch.setattr(reproduce.subprocess, "Popen", must_not_train)
  _fake_finished_run(str(tmp_path / "beta_vae_seed0"), "beta_vae", steps=20, value=0.8)
  running = tmp_path / "encdiff_seed0"  # half-way: a training record at step 10, one evaluation at step 8
  running.mkdir()
  (running / "config.json").write_text(json.dumps({"train": {"num_steps": 40}, "baseline": {"kind": ""}}))
  (running / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"stage": "diffusion", "step": 8, "loss": 0.5, "wall_s": 60.0, "images_seen": 256},
      {"stage": "eval", "step": 8, "factor_vae.eval_accuracy": 0.7, "wall_s": 60.0, "images_seen": 256},
      {"stage": "diffusion", "step": 10, "loss": 0.4, "wall_s": 90.0, "images_seen": 320}]) + "\n")
  assert reproduce.main([f"--root={tmp_path}", "--table=cpu", "--summary_only"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  rows = {row["run"]: row for row in summary["runs"]}
  assert set(rows) == {"encdiff_seed0", "beta_vae_seed0"}
  assert rows["encdiff_seed0"] == {"run": "encdiff_seed0", "finished": False, "step": 10, "planned": 40,
                                   "images_seen": 320, "wall_min": 1.5, "eval_step": 8,
                                   "factor_vae.eval_accuracy": 0.7, "dci.disentanglement": None,
                                   "mig.discrete_mig": None}
  assert rows["beta_vae_seed0"]["finished"] and "encdiff_seed0" in summary["not_finished"]
  assert "| encdiff_seed0 | 10 / 40 | 320 | 1.5 | 8 | 0.700 |  |  |" in (tmp_path / "summary.md").read_text()


def test_archive_keeps_what_rebuilds_the_table_and_no_checkpoints(tmp_path):
  root, archive = tmp_path / "runs", tmp_path / "kept"
  _fake_finished_run(str(root / "beta_vae_seed0"), "beta_vae", steps=20, value=0.8)
  _fake_finished_run(str(root / "encdiff_seed0"), steps=40, value=0.6)
  (root / "encdiff_seed0" / "diffusion").mkdir()
  (root / "encdiff_seed0" / "diffusion" / "40.ckpt").write_bytes(b"x" * 1000)
  (root / "encdiff_seed0" / "eval" / "notes.txt").write_text("not a metrics file")
  assert reproduce.main([f"--root={root}", "--table=cpu", "--summary_only", f"--archive={archive}"]) == 0
  kept = sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file())
  assert kept == ["beta_vae_seed0/config.json", "beta_vae_seed0/eval/metrics_20.json", "beta_vae_seed0/metrics.jsonl",
                  "encdiff_seed0/config.json", "encdiff_seed0/eval/metrics_40.json", "encdiff_seed0/metrics.jsonl"]
  # The archive alone rebuilds the same summary once the workdirs are gone.
  original = json.loads((root / "summary.json").read_text().replace(str(root), str(archive)))  # workdir paths
  for path in sorted(root.rglob("*"), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  assert reproduce.main([f"--root={archive}", "--table=cpu", "--summary_only"]) == 0
  assert json.loads((archive / "summary.json").read_text()) == original


_SLEEPER = """
import json, os, signal, sys, time
workdir = sys.argv[1]
os.makedirs(workdir, exist_ok=True)
def stop(signum, frame):
  open(os.path.join(workdir, 'stopped'), 'w').close()
  sys.exit(0)
signal.signal(signal.SIGTERM, stop)  # before seen.json: the test interrupts as soon as that file exists
autogroup = open('/proc/self/autogroup').read() if os.path.exists('/proc/self/autogroup') else ''
with open(os.path.join(workdir, 'seen.json.tmp'), 'w') as f:
  json.dump({'sid': os.getsid(0), 'autogroup': autogroup}, f)
os.replace(os.path.join(workdir, 'seen.json.tmp'), os.path.join(workdir, 'seen.json'))
time.sleep(60)
"""


@dataclasses.dataclass(frozen=True)
class _SleeperRun:
  name: str

  def command(self, root, nice=0):
    return ["nice", "-n", str(nice), sys.executable, "-c", _SLEEPER, os.path.join(root, self.name)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setsid and autogroups are Linux's")
def test_niced_runs_get_their_own_sid_and_are_stopped_like_a_preemption_on_ctrl_c(tmp_path, monkeypatch):
  import time
  run = _SleeperRun("sleeper")
  seen = tmp_path / "sleeper" / "seen.json"
  real_sleep, deadline = time.sleep, time.monotonic() + 120

  # Ctrl-C is a KeyboardInterrupt in the polling loop, raised here once the child has started. (A real SIGINT
  # to this process is not reliably delivered to the test under pytest-xdist's workers.)
  def poll_sleep_then_ctrl_c(seconds):
    if seen.exists():
      raise KeyboardInterrupt
    assert time.monotonic() < deadline, "the niced child never started"
    real_sleep(seconds)
  monkeypatch.setattr(reproduce.time, "sleep", poll_sleep_then_ctrl_c)
  with pytest.raises(KeyboardInterrupt):
    reproduce.run_all([run], str(tmp_path), nice=7, poll_s=0.05)
  monkeypatch.undo()
  assert (tmp_path / "sleeper" / "stopped").exists()  # SIGTERM reached it: train.py would save and exit 0
  info = json.loads(seen.read_text())
  assert info["sid"] != os.getsid(0)  # started with setsid: its own sid, so its own autogroup ...
  if info["autogroup"]:
    assert info["autogroup"].strip().endswith("nice 7")  # ... whose weight was lowered, not ours


def test_against_reference_takes_the_last_evaluation_reached_by_each_reference_minute():
  curve = [{"step": 1, "wall_s": 9.5 * 60, "images_seen": 100, "factor_vae.eval_accuracy": 0.70,
            "dci.disentanglement": 0.20},
           {"step": 2, "wall_s": 19.0 * 60, "images_seen": 200, "factor_vae.eval_accuracy": 0.779},
           {"step": 3, "wall_s": 20.5 * 60, "images_seen": 300, "factor_vae.eval_accuracy": 0.99,
            "dci.disentanglement": 0.90}]
  at_10, at_20, at_35 = reproduce.against_reference(curve)
  assert [p["reference_min"] for p in (at_10, at_20, at_35)] == [10.0, 20.0, 35.0]
  assert at_10["step"] == 1 and at_10["ahead"] is True  # 0.70 >= 0.62 and 0.20 >= 0.13
  # by minute 20 the run had only reached step 2 (step 3 came at 20.5 min): 0.779 < 0.78, no DCI scored
  assert at_20["step"] == 2 and at_20["dci"] is None and at_20["ahead"] is False
  assert at_35["step"] == 3 and at_35["ahead"] is True
  assert reproduce.against_reference([])[0]["ahead"] is None  # no evaluation by then: no verdict
  # DCI below the reference fails the point even when FactorVAE is above it
  low_dci = [{"step": 1, "wall_s": 60.0, "images_seen": 32, "factor_vae.eval_accuracy": 0.9,
              "dci.disentanglement": 0.1}]
  assert reproduce.against_reference(low_dci)[0]["ahead"] is False
