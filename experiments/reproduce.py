r"""The CPU reproduction tables from scratch: EncDiff vs beta-VAE vs beta-TCVAE, plus EncDiff's ablations.

  python experiments/reproduce.py --root=runs/fast [--table=fast] [--dry_run] [--only=encdiff_seed0] [--nice=19]
      [--parallel=2]

--table=fast (default; RESULTS.md's current table), each run `experiments/train.py` in its own workdir under --root:
  encdiff_seed{0,1,2}                   configs/repro_fast.py
  beta_vae_lr{1e-4,3e-4,1e-3}_seed0     configs/baseline_vae.py on repro_fast's data, one learning rate each
  beta_tcvae_lr{1e-4,3e-4,1e-3}_seed0   configs/baseline_tcvae.py likewise
  beta_vae_seed{1,2}, beta_tcvae_seed{1,2}   at the learning rate whose seed-0 run scored best (mean of FactorVAE
                                        and DCI disentanglement at its final evaluation): planned once those three
                                        have finished, so the VAEs are compared at their best of the three
  untrained_encoder                     configs/repro_fast.py evaluated at step 0
  then, for each finished encdiff_seed*, DCI on the code tables its evaluations at steps 1,600-6,400 saved
  (`experiments/evaluate.py --from_codes --step=S --metrics=dci`, ~6 min each on one core), so the curves have DCI
  at the reference's 10, 20 and 35 minutes without slowing the training runs
--table=cpu: the earlier table of configs/repro_cpu.py (archived in results/cpu_repro/runs):
  encdiff_seed{0,1,2}      configs/repro_cpu.py
  beta_vae_seed{0,1,2}     configs/baseline_vae.py
  beta_tcvae_seed{0,1,2}   configs/baseline_tcvae.py
  ablation_tokens5, ablation_tokens10, ablation_adagn, ablation_no_diffusion, ablation_uniform_t
                           configs/repro_cpu.py with one override, seed 0
  untrained_encoder        configs/repro_cpu.py evaluated at step 0 (the score of an untrained encoder)
(In the cpu table, 20 tokens with cross-attention and t/T ~ sigmoid(N(0, 1)) is encdiff_seed0 itself.) Seed 0 of
every model and the ablations run first,
so a partial table is already a comparison. A run whose final evaluation exists is skipped; an unfinished one
resumes from its last checkpoint (train.py does that), so the command can be re-run after any interruption.
Then it writes --root/summary.md (+ .json: mean ± std per model via experiments/aggregate.py, and the
ablation table, and each EncDiff seed against the earlier reference curve, REFERENCE_CURVE) and --root/curves.png
(every evaluated metric against training wall clock and images seen, the reference points marked).
--parallel=N runs N at a time, each pinned to its own CPU core with XLA's intra-op threading off: these small
models use a second core poorly (one process on 2 cores: 21 img/s for configs/repro_cpu.py; two pinned processes:
16.5 img/s each, 33 in all), so on a CPU machine the table finishes 1.6x sooner with one run per core.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Sequence

from etils import epath

from concept_diffusion.workdir import (absolute, atomic_path, eval_path, eval_steps, exists, read_metrics, read_text,
                                       write_json)
from experiments import aggregate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEEDS = (0, 1, 2)
ENCDIFF, BETA_VAE, BETA_TCVAE = "EncDiff", "beta-VAE", "beta-TCVAE"
CURVE_METRICS = ("factor_vae.eval_accuracy", "dci.disentanglement", "mig.discrete_mig")
# The reference curve the CPU recipes are read against (issue #9): one run of a minimal pixel-space EncDiff on the
# same 2-core VM, as (training minutes, images seen or None where not recorded, FactorVAE, DCI).
REFERENCE_CURVE = ((10.0, None, 0.62, 0.13), (20.0, 70_000, 0.78, 0.31), (35.0, 126_000, 0.85, 0.48))


@dataclasses.dataclass(frozen=True)
class Run:
  name: str  # workdir under --root
  group: str  # the table column / figure line this run belongs to
  config: str
  overrides: tuple[str, ...] = ()
  ablation: str = ""  # its row in the ablation table ("" = not an ablation row)
  # Steps whose saved code table gets DCI once the run has finished (Score below), for the curves: DCI costs
  # ~6 min per evaluation on one core, so the training run's own evaluations leave it out.
  dci_steps: tuple[int, ...] = ()

  def command(self, root: str, python: str = sys.executable, nice: int = 0) -> list[str]:
    return _niced(nice) + [python, os.path.join(REPO, "experiments", "train.py"), f"--config={self.config}",
                           f"--workdir={os.path.join(root, self.name)}", *self.overrides]

  def done(self, root: str) -> bool:
    return is_finished(os.path.join(root, self.name))


@dataclasses.dataclass(frozen=True)
class Score:
  """Adds `metric` to the evaluation a finished run saved its codes at, `step` (`encdiff-evaluate --from_codes`)."""
  run: str
  step: int
  metric: str = "dci"

  @property
  def name(self) -> str:
    return f"{self.run}@{self.step}:{self.metric}"

  def command(self, root: str, python: str = sys.executable, nice: int = 0) -> list[str]:
    return _niced(nice) + [python, os.path.join(REPO, "experiments", "evaluate.py"),
                           f"--workdir={os.path.join(root, self.run)}", "--from_codes", f"--step={self.step}",
                           f"--metrics={self.metric}"]

  def done(self, root: str) -> bool:
    path = eval_path(os.path.join(root, self.run), "metrics", self.step)
    return exists(path) and any(key.startswith(self.metric + ".") for key in json.loads(read_text(path)))


def _niced(nice: int) -> list[str]:
  return ["nice", "-n", str(nice)] if nice else []


def planned_scores(runs: Sequence[Run], root: str) -> list[Score]:
  """The DCI scorings still to do for the curves: each finished run's `dci_steps` that have a saved code table."""
  scores = []
  for run in runs:
    workdir = os.path.join(root, run.name)
    if run.dci_steps and run.done(root):
      saved = set(eval_steps(workdir, "codes"))
      scores += [Score(run.name, step) for step in run.dci_steps if step in saved]
  return [score for score in scores if not score.done(root)]


TABLES = ("fast", "cpu")
BASELINE_LRS = ("1e-4", "3e-4", "1e-3")  # disentanglement_lib's default first
# The VAEs see the EncDiff recipe's images: configs/baseline_*.py inherit repro_cpu's data (one ray per pixel).
FAST_DATA = ("--config.data.supersample=4", "--config.data.cache_dir=~/.cache/concept_diffusion")
# (run-name prefix, table group, config) of each VAE baseline.
VAES = (("beta_vae", BETA_VAE, "configs/baseline_vae.py"), ("beta_tcvae", BETA_TCVAE, "configs/baseline_tcvae.py"))


def planned_runs(seeds: Sequence[int] = SEEDS, table: str = "fast", root: str = "") -> list[Run]:
  """Every run of `table`, in execution order; for "fast", the VAEs' seeds 1 and 2 only once `root` shows which
  learning rate won on seed 0."""
  if table == "cpu":
    return cpu_table_runs(seeds)
  if table == "fast":
    return fast_table_runs(seeds, root)
  raise ValueError(f"unknown table {table!r}; known: {', '.join(TABLES)}")


def best_learning_rate(root: str, prefix: str) -> str | None:
  """The learning rate of BASELINE_LRS whose `<prefix>_lr<lr>_seed0` run scored best at its final evaluation (mean
  of FactorVAE and DCI disentanglement; the lower rate on a tie); None until all of them have finished."""
  scores = {}
  for lr in BASELINE_LRS:
    workdir = os.path.join(root, f"{prefix}_lr{lr}_seed0")
    if not root or not is_finished(workdir):
      return None
    record = json.loads(read_text(eval_path(workdir, "metrics", final_step(workdir))))
    scores[lr] = (record.get("factor_vae.eval_accuracy", 0.0) + record.get("dci.disentanglement", 0.0)) / 2
  return max(BASELINE_LRS, key=lambda lr: (scores[lr], -float(lr)))


# repro_fast evaluates every 1,600 steps (~10 min of training on one core): the reference curve's 10, 20 and 35
# minutes fall at or between the first four.
FAST_DCI_STEPS = (1600, 3200, 4800, 6400)


def fast_table_runs(seeds: Sequence[int] = SEEDS, root: str = "") -> list[Run]:
  """EncDiff (configs/repro_fast.py) and both VAEs at their best learning rate, 3 seeds each."""
  runs = [Run(f"encdiff_seed{seeds[0]}", ENCDIFF, "configs/repro_fast.py", (f"--config.seed={seeds[0]}",),
              dci_steps=FAST_DCI_STEPS)]
  chosen = {}
  for prefix, group, config in VAES:
    chosen[prefix] = best_learning_rate(root, prefix)
    for lr in BASELINE_LRS:
      runs.append(Run(f"{prefix}_lr{lr}_seed{seeds[0]}", group if lr == chosen[prefix] else f"{group}, lr {lr}",
                      config, (f"--config.seed={seeds[0]}", *FAST_DATA, f"--config.baseline.lr={lr}"),
                      ablation=f"{group}, lr {lr} (seed {seeds[0]})"))
  runs.append(Run("untrained_encoder", "EncDiff encoder, untrained", "configs/repro_fast.py",
                  (f"--config.seed={seeds[0]}", "--config.train.num_steps=0", "--config.sample.final_figures=False"),
                  ablation="reference: the same encoder untrained (0 steps)"))
  runs += [Run(f"encdiff_seed{seed}", ENCDIFF, "configs/repro_fast.py", (f"--config.seed={seed}",),
               dci_steps=FAST_DCI_STEPS) for seed in seeds[1:]]
  for prefix, group, config in VAES:
    if chosen[prefix] is not None:
      runs += [Run(f"{prefix}_seed{seed}", group, config,
                   (f"--config.seed={seed}", *FAST_DATA, f"--config.baseline.lr={chosen[prefix]}"))
               for seed in seeds[1:]]
  return runs


def cpu_table_runs(seeds: Sequence[int] = SEEDS) -> list[Run]:
  """Every run of the repro_cpu table, in execution order: seed 0 of each model, the ablations, then the other
  seeds."""
  def models(seed):
    seed_flag = (f"--config.seed={seed}",)
    return [Run(f"encdiff_seed{seed}", ENCDIFF, "configs/repro_cpu.py", seed_flag,
                ablation="20 tokens, cross-attention, logit-normal t" if seed == seeds[0] else ""),
            Run(f"beta_vae_seed{seed}", BETA_VAE, "configs/baseline_vae.py", seed_flag),
            Run(f"beta_tcvae_seed{seed}", BETA_TCVAE, "configs/baseline_tcvae.py", seed_flag)]
  first = (f"--config.seed={seeds[0]}",)
  ablations = [
      # What the metrics give before any training: a random CNN's features already separate the large floor and
      # wall regions' hues, so this, not 0, is the floor EncDiff's scores should be read against.
      Run("untrained_encoder", "EncDiff encoder, untrained", "configs/repro_cpu.py",
          first + ("--config.train.num_steps=0", "--config.sample.final_figures=False"),
          ablation="reference: the same encoder untrained (0 steps)"),
      Run("ablation_tokens5", "EncDiff, 5 tokens", "configs/repro_cpu.py", first + ("--config.encoder.num_tokens=5",),
          ablation="5 tokens, cross-attention"),
      Run("ablation_tokens10", "EncDiff, 10 tokens", "configs/repro_cpu.py",
          first + ("--config.encoder.num_tokens=10",), ablation="10 tokens, cross-attention"),
      Run("ablation_adagn", "EncDiff, AdaGN", "configs/repro_cpu.py", first + ("--config.unet.conditioning=adagn",),
          ablation="20 tokens, AdaGN"),
      Run("ablation_no_diffusion", "EncDiff, w/o diffusion", "configs/repro_cpu.py",
          first + ("--config.diffusion.objective=one_shot",), ablation="20 tokens, w/o diffusion (one-shot decoder)"),
      # The paper's (official) uniform timesteps; configs/repro_cpu.py draws them around mid noise instead.
      Run("ablation_uniform_t", "EncDiff, uniform t (paper)", "configs/repro_cpu.py",
          first + ("--config.diffusion.timestep_sampling=uniform",),
          ablation="20 tokens, uniform t (the paper's sampling)"),
  ]
  return models(seeds[0]) + ablations + [run for seed in seeds[1:] for run in models(seed)]


def final_step(workdir: str) -> int | None:
  """The step a run's final evaluation is written at, from its config.json (None before the run started)."""
  path = os.path.join(workdir, "config.json")
  if not exists(path):
    return None
  config = json.loads(read_text(path))
  baseline = config.get("baseline", {})
  return int(baseline["num_steps"] if baseline.get("kind") else config["train"]["num_steps"])


def is_finished(workdir: str) -> bool:
  step = final_step(workdir)
  return step is not None and exists(eval_path(workdir, "metrics", step))


def _records(workdir: str) -> list[dict]:
  """The run's metrics.jsonl records, in order ([] before the run wrote any)."""
  return read_metrics(workdir)


def eval_curves(workdir: str) -> list[dict]:
  """The run's evaluations from metrics.jsonl (stage "eval", with wall_s and images_seen), one per step, with the
  metrics of the step's eval/metrics_<step>.json added: a metric scored afterwards from a saved code table
  (`encdiff-evaluate --from_codes --step=S --metrics=dci`) joins the curve at its step."""
  by_step = {}
  for record in _records(workdir):
    if record.get("stage") == "eval" and "wall_s" in record:
      by_step[record["step"]] = record  # a re-evaluation of a step replaces the earlier one
  for step, record in by_step.items():
    path = eval_path(workdir, "metrics", step)
    if exists(path):
      scored = json.loads(read_text(path))
      by_step[step] = {**{k: v for k, v in scored.items() if isinstance(v, float)}, **record}
  return [by_step[s] for s in sorted(by_step)]


def against_reference(curve: Sequence[dict]) -> list[dict]:
  """For each REFERENCE_CURVE point, the run's last evaluation at or before its minute of training (the score
  the run had reached by then) beside the reference's FactorVAE and DCI; `ahead` is True when each metric the
  evaluation has is at or above the reference's, None when the run had no evaluation by then."""
  rows = []
  for minutes, images, factor_vae, dci in REFERENCE_CURVE:
    reached = [r for r in curve if r["wall_s"] / 60 <= minutes]
    row = {"reference_min": minutes, "reference_images": images, "reference_factor_vae": factor_vae,
           "reference_dci": dci, "ahead": None}
    if reached:
      last = reached[-1]
      row.update(step=last["step"], wall_min=last["wall_s"] / 60, images_seen=int(last["images_seen"]),
                 factor_vae=last.get("factor_vae.eval_accuracy"), dci=last.get("dci.disentanglement"))
      pairs = [(row[k], ref) for k, ref in (("factor_vae", factor_vae), ("dci", dci)) if row[k] is not None]
      row["ahead"] = bool(pairs) and all(value >= ref for value, ref in pairs)
    rows.append(row)
  return rows


def started_curves(runs: Sequence[Run], root: str) -> dict[str, list[dict]]:
  """eval_curves of each run that has started (written metrics.jsonl), by run name, in `runs`' order."""
  return {run.name: eval_curves(os.path.join(root, run.name)) for run in runs
          if exists(os.path.join(root, run.name, "metrics.jsonl"))}


def plot_curves(runs: Sequence[Run], curves: dict[str, list[dict]], path: str) -> None:
  """Rows: metrics; columns: against training wall clock (minutes) and images seen. One colour per model.
  `curves`: started_curves(runs, root)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = list(dict.fromkeys(run.group for run in runs))
  colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
  fig, axes = plt.subplots(len(CURVE_METRICS), 2, figsize=(11, 3.2 * len(CURVE_METRICS)), squeeze=False)
  labelled = set()
  for run in runs:
    records = curves.get(run.name, [])
    for row, metric in enumerate(CURVE_METRICS):
      points = [(r["wall_s"] / 60, r["images_seen"], r[metric]) for r in records if metric in r]
      if not points:
        continue
      minutes, images, values = zip(*points)
      style = dict(color=colours[run.group], marker="o", markersize=3, linewidth=1,
                   linestyle="-" if run.group in (ENCDIFF, BETA_VAE, BETA_TCVAE) else "--")
      label = run.group if run.group not in labelled else None
      labelled.add(run.group)
      axes[row, 0].plot(minutes, values, label=label, **style)
      axes[row, 1].plot(images, values, **style)
  reference_rows = {"factor_vae.eval_accuracy": 2, "dci.disentanglement": 3}
  for row, metric in enumerate(CURVE_METRICS):
    if metric in reference_rows:
      points = [(p[0], p[1], p[reference_rows[metric]]) for p in REFERENCE_CURVE]
      axes[row, 0].plot([p[0] for p in points], [p[2] for p in points], "kx", markersize=7,
                        label="reference (issue #9)" if row == 0 else None)
      known = [p for p in points if p[1] is not None]
      axes[row, 1].plot([p[1] for p in known], [p[2] for p in known], "kx", markersize=7)
    axes[row, 0].set_ylabel(metric)
    for col, xlabel in enumerate(("training wall clock (min)", "images seen")):
      axes[row, col].set_xlabel(xlabel)
      axes[row, col].set_ylim(0, 1.02)
      axes[row, col].grid(alpha=0.3)
    axes[row, 1].set_xscale("log")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Procedural Shapes 32x32 on 2 CPU cores; one line per run (DCI where it was scored)")
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


def summarise(runs: Sequence[Run], root: str, curves: dict[str, list[dict]]) -> tuple[str, dict]:
  """Markdown (main table: mean ± std per model; ablation table) and the JSON behind it, finished runs only;
  the reference comparison and the per-run rows from `curves` (started_curves(runs, root))."""
  done = [run for run in runs if run.done(root)]
  main_groups = (ENCDIFF, BETA_VAE, BETA_TCVAE)
  summary = {}
  for group in main_groups:
    workdirs = [os.path.join(root, run.name) for run in done if run.group == group]
    if workdirs:
      (entry,) = aggregate.aggregate(workdirs).values()  # one dataset: procedural_shapes
      summary[group] = entry
  ablations = {}
  for run in done:
    if run.ablation:
      (entry,) = aggregate.aggregate([os.path.join(root, run.name)]).values()
      ablations[run.ablation] = entry
  text = ["# Reproduction on 2 CPU cores (procedural Shapes, 32x32)", ""]
  text += [aggregate.markdown_table(summary) if summary else "No finished runs yet.", ""]
  if ablations:
    text += ["## EncDiff ablations (seed 0)", "", aggregate.markdown_table(ablations), ""]
  missing = [run.name for run in runs if run not in done]
  if missing:
    text += [f"Not finished: {', '.join(missing)}.", ""]
  reference = {run.name: against_reference(curves[run.name]) for run in runs
               if run.name in curves and run.group == ENCDIFF}  # the table seeds (ablations and references have their own groups)
  if reference:
    text += ["## EncDiff against the reference curve", "",
             "Each run's last evaluation at or before the reference's minute of training (FactorVAE / DCI; DCI only "
             "where it was scored).", "",
             "| run | reference: min, images, FactorVAE / DCI | run: min, images, FactorVAE / DCI | at or above |",
             "|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"
    for name, points in reference.items():
      for p in points:
        images = "–" if p["reference_images"] is None else f"{p['reference_images']:,}"
        ours = ("no evaluation yet" if p["ahead"] is None else
                f"{p['wall_min']:.1f}, {p['images_seen']:,}, {fmt(p['factor_vae'])} / {fmt(p['dci'])}")
        verdict = {None: "–", True: "yes", False: "no"}[p["ahead"]]
        text.append(f"| {name} | {p['reference_min']:.0f}, {images}, {p['reference_factor_vae']:.2f} / "
                    f"{p['reference_dci']:.2f} | {ours} | {verdict} |")
    text.append("")
  rows = run_rows(runs, root, curves)
  if rows:
    text += ["## Every run (latest evaluation; training wall clock excludes evaluation)", "",
             "| run | steps done / planned | images seen | training wall (min) | evaluated at step | "
             + " | ".join(CURVE_METRICS) + " |", "|---" * (5 + len(CURVE_METRICS)) + "|"]
    for row in rows:
      values = " | ".join("" if row.get(m) is None else f"{row[m]:.3f}" for m in CURVE_METRICS)
      text.append(f"| {row['run']} | {row['step']} / {row['planned']} | {row['images_seen']:,} | "
                  f"{row['wall_min']:.1f} | {row.get('eval_step', '')} | {values} |")
    text.append("")
  return "\n".join(text), {"models": summary, "ablations": ablations, "not_finished": missing, "runs": rows,
                           "against_reference": reference}


def run_rows(runs: Sequence[Run], root: str, curves: dict[str, list[dict]]) -> list[dict]:
  """One row per started run (one in `curves`): progress (last training record) and its latest evaluation,
  finished or not."""
  rows = []
  for run in runs:
    if run.name not in curves:
      continue
    workdir = os.path.join(root, run.name)
    training = [r for r in _records(workdir) if r.get("stage") != "eval" and "wall_s" in r]
    last = training[-1] if training else {}
    row = {"run": run.name, "finished": is_finished(workdir), "step": last.get("step", 0),
           "planned": final_step(workdir), "images_seen": int(last.get("images_seen", 0)),
           "wall_min": last.get("wall_s", 0.0) / 60}
    evals = curves[run.name]
    if evals:
      row["eval_step"] = evals[-1]["step"]
      row.update({m: evals[-1].get(m) for m in CURVE_METRICS})
    rows.append(row)
  return rows


def single_core_env() -> dict[str, str]:
  """The environment of a run pinned to one core: XLA:CPU without its intra-op thread pool."""
  env = dict(os.environ)
  flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  return env


def _lower_priority(core: int | None, nice: int) -> None:
  """In the child before exec: pin it to `core`, and under Linux's autogroup scheduling (one group per setsid()
  group, e.g. per terminal) lower its group's weight too, since `nice` alone only ranks processes within a group
  and would leave the run competing on equal terms with the user's other terminals."""
  if core is not None:
    os.sched_setaffinity(0, {core})
  if nice > 0:
    os.setsid()  # detached from the terminal, so its own autogroup: lowering it leaves the caller's group alone
    try:
      with open("/proc/self/autogroup", "w", encoding="ascii") as f:
        f.write(str(min(nice, 19)))
    except OSError:  # not Linux, or autogroup off: `nice` alone then does the job
      pass


def run_all(runs: Sequence[Run], root: str, *, nice: int = 0, parallel: int = 1,
            poll_s: float = 2.0) -> list[str]:
  """Runs `runs` in order, `parallel` at a time (pinned to distinct cores when above 1); the names that did not
  finish. A run that exits 0 without its final evaluation was preempted: re-running resumes it."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
  if parallel > 1 and parallel > len(cores):
    raise ValueError(f"--parallel={parallel} but only {len(cores)} CPU cores are available to this process; "
                     f"use --parallel<={len(cores)}.")
  queue, active, failed = list(runs), {}, []  # active: free-core index -> (run, process)
  try:
    _schedule(queue, active, failed, root, nice=nice, parallel=parallel, cores=cores, poll_s=poll_s)
  except KeyboardInterrupt:
    # Runs with --nice are detached (setsid), out of reach of the terminal's Ctrl-C: stop them the way a
    # preemption does (SIGTERM: train.py saves a checkpoint and exits 0), so the next call resumes them.
    for run, process in active.values():
      process.terminate()
    for run, process in active.values():
      process.wait()
      print(f"[stopped] {run.name}; re-run this command to resume it.", flush=True)
    raise
  return failed


def _schedule(queue, active, failed, root, *, nice, parallel, cores, poll_s) -> None:
  while queue or active:
    for slot in range(parallel):
      if slot in active or not queue:
        continue
      run = queue.pop(0)
      command = run.command(root, nice=nice)
      print("[run] " + " ".join(command) + (f"  (core {cores[slot]})" if parallel > 1 else ""), flush=True)
      core = cores[slot] if parallel > 1 else None
      process = subprocess.Popen(command, cwd=REPO, env=single_core_env() if core is not None else None,
                                 preexec_fn=functools.partial(_lower_priority, core, nice))
      active[slot] = (run, process)
    for slot, (run, process) in list(active.items()):
      code = process.poll()
      if code is None:
        continue
      del active[slot]
      if code != 0 or not run.done(root):
        failed.append(run.name)
        print(f"[unfinished] {run.name} (exit code {code}); re-run this command to resume it.", flush=True)
      else:
        print(f"[finished] {run.name}", flush=True)
    if active:
      time.sleep(poll_s)


def archive_runs(runs: Sequence[Run], root: str, archive: str) -> list[str]:
  """Copies what the table and curves are built from (config.json, metrics.jsonl, eval/metrics_*.json; a few KB,
  no checkpoints) of every started run to archive/<run>, so `--summary_only --root=<archive>` rebuilds them
  anywhere, e.g. from a results folder kept in git after the workdirs are gone. Returns the runs copied."""
  copied = []
  for run in runs:
    workdir = os.path.join(root, run.name)
    if not exists(os.path.join(workdir, "metrics.jsonl")):
      continue
    target = os.path.join(archive, run.name)
    names = [name for name in ("config.json", "metrics.jsonl") if exists(os.path.join(workdir, name))]
    names += [eval_path("", "metrics", step) for step in eval_steps(workdir, "metrics")]  # eval/metrics_<step>.json
    for name in names:  # each copied whole, atomically (atomic_path), local or remote on either side
      with atomic_path(os.path.join(target, name)) as tmp, open(tmp, "wb") as f:
        f.write(epath.Path(workdir, name).read_bytes())
    copied.append(run.name)
  return copied


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--root", default="runs/fast", help="directory holding one workdir per run")
  parser.add_argument("--table", default="fast", choices=TABLES,
                      help="fast: configs/repro_fast.py and the VAEs at their best learning rate (RESULTS.md); "
                           "cpu: the earlier configs/repro_cpu.py table with its ablations")
  parser.add_argument("--dry_run", action="store_true", help="print the commands (and what is done) and stop")
  parser.add_argument("--only", default="", help="comma-separated run names to run (default: all)")
  parser.add_argument("--nice", type=int, default=0, help="run the training commands under `nice -n NICE`")
  parser.add_argument("--summary_only", action="store_true",
                      help="train nothing: write summary.md/.json and curves.png from the runs as they are (runs "
                           "still training elsewhere show up with the evaluations they have so far)")
  parser.add_argument("--parallel", type=int, default=1,
                      help="runs at a time; above 1, each is pinned to its own CPU core (CPU machines)")
  parser.add_argument("--archive", default="",
                      help="also copy every started run's config.json, metrics.jsonl and eval/metrics_*.json "
                           "(no checkpoints) to ARCHIVE/<run>, e.g. results/cpu_repro/runs to keep them in git")
  args = parser.parse_args(argv)
  if args.parallel < 1:
    print(f"error: --parallel must be >= 1, got {args.parallel}", file=sys.stderr)
    return 2
  root = absolute(args.root)  # a URL (gs://...) stays one
  runs = planned_runs(table=args.table, root=root)
  names = [name for name in args.only.split(",") if name]
  known = {run.name for run in runs}
  if args.table == "fast":  # the VAEs' later seeds have names before their learning rate is known
    known |= {f"{prefix}_seed{seed}" for prefix, _, _ in VAES for seed in SEEDS[1:]}
  unknown = sorted(set(names) - known)
  if unknown:
    print(f"error: unknown run(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
    return 2

  def pending_runs(runs, report):
    pending = []
    for run in runs:
      if names and run.name not in names:
        continue
      if run.done(root):
        if report:
          print(f"[done] {run.name}")
      else:
        pending.append(run)
    return [] if args.summary_only else pending

  def pending_scores(runs):
    scores = [score for score in planned_scores(runs, root) if not names or score.run in names]
    return [] if args.summary_only else scores

  pending = pending_runs(runs, report=True) + pending_scores(runs)
  if args.dry_run:
    for run in pending:
      print("[would run] " + " ".join(run.command(root, nice=args.nice)), flush=True)
    if args.table == "fast" and not all(best_learning_rate(root, prefix) for prefix, _, _ in VAES):
      print("[then] the VAEs' seeds 1 and 2 at the learning rate that wins on seed 0")
    steps = sorted({step for run in runs if not run.done(root) for step in run.dci_steps})
    if steps:
      print(f"[then] DCI on the code tables each EncDiff run saved at steps {', '.join(map(str, steps))}, once "
            "it has finished (for the curves)")
    print(f"[would write] {os.path.join(root, 'summary.md')}, {os.path.join(root, 'summary.json')}, "
          f"{os.path.join(root, 'curves.png')}")
    return 0
  signal.signal(signal.SIGTERM, _interrupt)  # stop the runs as Ctrl-C does
  failed, started = [], set()
  while pending:  # a finished stage can plan more runs (the VAEs' later seeds, once their learning rate is known)
    started |= {run.name for run in pending}
    failed += run_all(pending, root, nice=args.nice, parallel=args.parallel)
    runs = planned_runs(table=args.table, root=root)
    pending = [run for run in pending_runs(runs, report=False) + pending_scores(runs) if run.name not in started]
  curves = started_curves(runs, root)
  text, data = summarise(runs, root, curves)
  with atomic_path(os.path.join(root, "summary.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  write_json(os.path.join(root, "summary.json"), aggregate._nan_to_none(data), indent=2)  # pylint: disable=protected-access
  plot_curves(runs, curves, os.path.join(root, "curves.png"))
  print(text)
  print(f"wrote {os.path.join(root, 'summary.md')}, summary.json and curves.png")
  if args.archive and absolute(args.archive) != root:
    copied = archive_runs(runs, root, absolute(args.archive))
    print(f"archived {len(copied)} run(s) to {args.archive}: {', '.join(copied)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
