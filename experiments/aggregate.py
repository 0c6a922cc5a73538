"""Mean ± std of the final evaluation metrics over runs, per dataset.

Usage:
  python experiments/aggregate.py runs/shapes3d_seed* runs/mpi3d_seed* [--json=summary.json]

Each workdir W must hold `W/eval/metrics_<step>.json` (a flat {metric: float} dict, optionally with "step" and
"dataset"); the file with the largest step is the run's final result. The dataset name comes from that file or,
failing that, from `W/config.json` (`data.name`). Papers in this area report mean ± std over seeds; we use the
sample std (ddof=1), which is what "± std over n runs" usually means for small n.

A run whose final metrics hold NaN or inf, and a workdir given twice (under any spelling), are refused: either
would make the table wrong without saying so.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Any, Sequence

from etils import epath
import numpy as np

from concept_diffusion.workdir import eval_path, eval_steps, is_remote, write_json

_NON_METRIC_KEYS = frozenset({"step", "dataset"})


def final_metrics_file(workdir: epath.Path) -> epath.Path:
  """The eval/metrics_<step>.json with the numerically largest step (metrics_1200 beats metrics_300)."""
  steps = eval_steps(str(workdir), "metrics")
  if not steps:
    raise FileNotFoundError(f"{workdir}: no eval/metrics_<step>.json found; has this run been evaluated? "
                            "(evaluation writes them at the end of training or at each eval interval)")
  return epath.Path(eval_path(str(workdir), "metrics", steps[-1]))


def _dataset_name(workdir: epath.Path, metrics: dict[str, Any]) -> str:
  if isinstance(metrics.get("dataset"), str):
    return metrics["dataset"]
  config_path = workdir / "config.json"
  if config_path.is_file():
    name = json.loads(config_path.read_text()).get("data", {}).get("name")
    if isinstance(name, str):
      return name
  raise ValueError(f"{workdir}: cannot tell the dataset: the metrics file has no 'dataset' and "
                   f"{config_path} has no data.name.")


def final_scores(workdir: str | epath.Path) -> tuple[str, dict[str, float]]:
  """(dataset, {metric: value}) of a run's final evaluation."""
  workdir = epath.Path(workdir)
  path = final_metrics_file(workdir)
  raw = json.loads(path.read_text())
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a JSON object of metric name -> number.")
  values = {key: float(value) for key, value in raw.items()
            if key not in _NON_METRIC_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)}
  bad = [f"{key}={value}" for key, value in values.items() if not math.isfinite(value)]
  if bad:
    raise ValueError(f"{workdir}: {path} has non-finite {', '.join(bad)}; a mean over runs that includes it is "
                     f"meaningless. Re-evaluate the run (encdiff-evaluate --workdir={workdir}) or leave it out.")
  return _dataset_name(workdir, raw), values


def _summary(values: list[float]) -> dict[str, float]:
  n = len(values)
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if n > 1 else math.nan, "n": n}


def aggregate(workdirs: Sequence[str | epath.Path]) -> dict[str, dict[str, Any]]:
  """{dataset: {"n_runs", "workdirs", "metrics": {metric: {"mean", "std", "n"}}}}; std is ddof=1 (NaN if n=1)."""
  if not workdirs:
    raise ValueError("no workdirs given.")
  seen: dict[str, str | epath.Path] = {}
  for workdir in workdirs:  # resolved: runs/a, runs/a/, ./runs/a and a symlink to it are one run
    # (pathlib's resolve: epath's follows no symlinks and would turn gs://b/a into <cwd>/gs:/b/a)
    resolved = str(epath.Path(workdir)) if is_remote(workdir) else str(pathlib.Path(workdir).resolve())
    if resolved in seen:
      first = seen[resolved]
      also = "" if str(first) == str(workdir) else f" (also as {first})"
      raise ValueError(f"{workdir}: given twice{also}, so its run would count twice in n. Give each workdir once.")
    seen[resolved] = workdir
  runs: dict[str, list[tuple[str, dict[str, float]]]] = {}
  for workdir in workdirs:
    dataset, values = final_scores(workdir)
    runs.setdefault(dataset, []).append((str(workdir), values))
  result = {}
  for dataset, dataset_runs in sorted(runs.items()):
    names = sorted({name for _, values in dataset_runs for name in values})
    result[dataset] = {
        "n_runs": len(dataset_runs),
        "workdirs": [workdir for workdir, _ in dataset_runs],
        "metrics": {name: _summary([values[name] for _, values in dataset_runs if name in values])
                    for name in names},
    }
  return result


def _cell(stats: dict[str, float] | None, n_runs: int) -> str:
  if stats is None:
    return "–"
  text = f"{stats['mean']:.3f}" if stats["n"] == 1 else f"{stats['mean']:.3f} ± {stats['std']:.3f}"
  return text if stats["n"] == n_runs else f"{text} (n={stats['n']})"


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
  """One row per metric, one column per dataset."""
  datasets = list(summary)
  names = sorted({name for entry in summary.values() for name in entry["metrics"]})
  header = "| metric | " + " | ".join(f"{d} (n={summary[d]['n_runs']})" for d in datasets) + " |"
  lines = ["Mean ± sample std (ddof=1) over runs; n = number of runs.", "", header,
           "|---|" + "---|" * len(datasets)]
  for name in names:
    cells = [_cell(summary[d]["metrics"].get(name), summary[d]["n_runs"]) for d in datasets]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _nan_to_none(value: Any) -> Any:
  """NaN (the std of a single run) becomes null, so the file is strict JSON."""
  if isinstance(value, dict):
    return {key: _nan_to_none(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_nan_to_none(item) for item in value]
  return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories containing eval/metrics_<step>.json")
  parser.add_argument("--json", dest="json_path", default=None, help="also write the summary to this JSON file")
  args = parser.parse_args(argv)
  try:
    summary = aggregate(args.workdirs)
  except (FileNotFoundError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if args.json_path:  # before the table, so a failed write leaves only its error line
    try:
      write_json(args.json_path, _nan_to_none(summary), indent=2)
    except OSError as error:
      print(f"error: cannot write {args.json_path}: {error.strerror or error}", file=sys.stderr)
      return 2
  print(markdown_table(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
