"""Every file of a run, by job: where each lives (layout), how it is read and written on a local disk or a remote
filesystem (storage), the one-training-per-workdir lock (lock), config.json (run_config), and metrics.jsonl with
its TensorBoard mirror (metrics). Reading evaluation records back is evaluation/records.py's.

W may be a local path or a URL of a remote filesystem (gs://bucket/run); storage.py says what differs there, and why.
"""
from concept_diffusion.workdir.layout import (AE_DIR, BASELINE_DIR, CONFIG_FILE, DIFFUSION_DIR, EVAL_DIR,
                                              EVAL_FILE_SUFFIXES, FIGURES_DIR, LOCK_FILE, METRICS_FILE,
                                              TENSORBOARD_DIR, ensure_workdir, eval_path, eval_steps, figure_path,
                                              first_stage_dir)
from concept_diffusion.workdir.lock import WorkdirInUse, workdir_lock
from concept_diffusion.workdir.metrics import MetricWriter, read_metrics
from concept_diffusion.workdir.run_config import check_or_write_config, load_config
from concept_diffusion.workdir.storage import (LocalStorage, RemoteStorage, absolute, append_text, atomic_path,
                                               exists, is_remote, load_npy, local_copy, read_text, storage_for,
                                               write_json)

__all__ = ["AE_DIR", "BASELINE_DIR", "CONFIG_FILE", "DIFFUSION_DIR", "EVAL_DIR", "EVAL_FILE_SUFFIXES", "FIGURES_DIR",
           "LOCK_FILE", "METRICS_FILE", "TENSORBOARD_DIR", "ensure_workdir", "eval_path", "eval_steps",
           "figure_path", "first_stage_dir", "WorkdirInUse", "workdir_lock", "MetricWriter", "read_metrics",
           "check_or_write_config", "load_config", "LocalStorage", "RemoteStorage", "absolute", "append_text",
           "atomic_path", "exists", "is_remote", "load_npy", "local_copy", "read_text", "storage_for", "write_json"]
