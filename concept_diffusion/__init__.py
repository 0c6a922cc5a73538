"""concept-diffusion: EncDiff (arXiv 2402.09712) in JAX/Flax.

`concept_diffusion.load_run(workdir)` opens a trained run (api.py); `concept_diffusion.models.encdiff` is the
model. Importing the package sets no global JAX flag.
"""
__version__ = "0.1.0"


def __getattr__(name):
  # load_run pulls in JAX and Flax; a lazy attribute keeps `import concept_diffusion.data` etc. light.
  if name in ("load_run", "Run"):
    from concept_diffusion import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f"module 'concept_diffusion' has no attribute {name!r}")
