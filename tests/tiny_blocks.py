"""The 60-image stored dataset of the tests (registered as "tiny_blocks" on import): tests/conftest.py imports it
for the suite's own process, and a console script in a subprocess gets it with the tests folder on PYTHONPATH and
--config.extensions=('tiny_blocks',)."""
import numpy as np

from concept_diffusion import data as data_lib


class TinyBlocks(data_lib.GroundTruthDataset):
  """60 images, 16x16x3, read from a host array: a stored dataset small enough to encode in tests.

  Factor 0 shifts a block horizontally, factor 1 vertically, factor 2 sets its colour.
  """
  name = "tiny_blocks"
  factor_names = ("x", "y", "color")
  factor_sizes = (3, 4, 5)
  image_shape = (16, 16, 3)

  def images(self, indices):
    factors = self.index_to_factors(indices)
    out = np.full((len(factors), 16, 16, 3), -1.0, np.float32)
    for i, (x, y, c) in enumerate(factors):
      out[i, 2 + 3 * y:6 + 3 * y, 2 + 4 * x:6 + 4 * x] = [c / 2 - 1, 1 - c / 2, 0.5]
    return out


if "tiny_blocks" not in data_lib.known_datasets():
  data_lib.register_dataset("tiny_blocks", lambda data_config: TinyBlocks())
