"""EncDiff's scores against images seen: the table runs, their extensions and reruns, and the issue's reference.

Usage, from the repository root (reads only the archived records; writes results/cpu_repro/longer_runs.png):
  python results/cpu_repro/scripts/longer_runs_figure.py
"""
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from concept_diffusion.train.workdir import eval_path, eval_steps, load_config  # noqa: E402

ROOT = "results/cpu_repro"
# Issue #9's curve for a minimal pixel-space EncDiff on the same machine (one run): images -> FactorVAE, DCI, MIG.
REFERENCE = {37_000: (0.62, 0.13, 0.03), 70_000: (0.78, 0.31, 0.06), 126_000: (0.85, 0.48, 0.11)}
METRICS = (("factor_vae.eval_accuracy", "FactorVAE", 0.90), ("dci.disentanglement", "DCI disentanglement", 0.70),
           ("mig.discrete_mig", "MIG", None))
SOURCES = (  # (label, directories of one seed's records, in training order; line style)
    ("table run (2,400 steps) + its extension", ("runs/encdiff_seed{s}", "extensions/encdiff_seed{s}_to4000_partial"), "-"),
    ("rerun from scratch to 4,000 steps", ("extensions/encdiff_seed{s}_rerun4000",), "--"),
)


def evaluations(directory):
  """{images seen: evaluation record} of one archived run directory."""
  workdir = os.path.join(ROOT, directory)
  if not os.path.isdir(workdir):
    return {}
  batch_size = load_config(workdir).train.batch_size
  points = {}
  for step in eval_steps(workdir, "metrics"):
    with open(eval_path(workdir, "metrics", step), encoding="utf-8") as f:
      points[step * batch_size] = json.load(f)
  return points


fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 4.2))
colours = {0: "tab:blue", 1: "tab:orange", 2: "tab:green"}
for label, directories, style in SOURCES:
  for seed in (0, 1, 2):
    points = {}
    for directory in directories:
      points.update(evaluations(directory.format(s=seed)))
    if not points:
      continue
    for ax, (key, _, _) in zip(axes, METRICS):
      xy = sorted((images, record[key]) for images, record in points.items() if key in record)
      if xy:
        ax.plot(*zip(*xy), style, marker="o", markersize=4, color=colours[seed], label=f"seed {seed}, {label}")
for column, (ax, (_, title, target)) in enumerate(zip(axes, METRICS)):
  images = sorted(REFERENCE)
  ax.plot(images, [REFERENCE[i][column] for i in images], ":", marker="s", color="black",
          label="issue #9 reference (one run)")
  if target is not None:
    ax.axhline(target, color="red", linewidth=0.8, label="target (mean of 3 seeds)")
  ax.set_title(title)
  ax.set_xlabel("images seen")
  ax.set_ylim(0, 1.0)
  ax.grid(alpha=0.3)
axes[0].legend(fontsize=6.5, loc="lower right")
fig.suptitle("EncDiff (configs/repro_cpu.py) on procedural Shapes 32x32: DCI only at final evaluations")
fig.tight_layout()
fig.savefig(os.path.join(ROOT, "longer_runs.png"), dpi=100)
print("wrote", os.path.join(ROOT, "longer_runs.png"))
