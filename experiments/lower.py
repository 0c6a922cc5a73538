r"""Lowers a config's train steps, encoder pass and DDIM sampler for TPU and GPU without the device.

  encdiff-lower --config=procedural_shapes --platforms=tpu,cuda [--config.mesh.fsdp=2]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 encdiff-lower --config=smoke --platforms=tpu,cuda \
      --config.mesh.data=4 --config.mesh.fsdp=2 --config.train.batch_size=8 --config.first_stage.batch_size=8

Prints OK or the error per function and platform; exits 1 if any failed. The mesh is built from the devices JAX
sees here (fake CPU devices stand in for a pod slice's chips). concept_diffusion/tools/lower.py says what this
checks and what it cannot.
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from concept_diffusion import parallel
from concept_diffusion.config import validate_config
from concept_diffusion.tools import cli, lower

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config: a name in configs/ or a .py file.",
                                          lock_config=True)
_PLATFORMS = flags.DEFINE_list("platforms", ["tpu", "cuda"], f"Platforms to lower for: {', '.join(lower.PLATFORMS)}.")
flags.mark_flags_as_required(["config"])


def _main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  validate_config(config)
  mesh = parallel.make_mesh(config.mesh)
  print(f"mesh {dict(mesh.shape)} over {mesh.size} {mesh.devices.flat[0].platform} device(s)")
  results = lower.lower_all(config, mesh, _PLATFORMS.value)
  print(lower.format_results(results))
  failed = [r for r in results if not r.ok]
  if failed:
    print(f"{len(failed)} of {len(results)} lowerings failed.", file=sys.stderr)
    sys.exit(1)


def main():
  cli.run(_main)


if __name__ == "__main__":
  main()
