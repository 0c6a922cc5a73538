"""The design's import rules (../DESIGN.md "Layout"), read from the source: arrows point one way, and no
function-local import dodges a cycle."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "concept_diffusion"

# Function-local imports of the package that are allowed: optional heavy dependencies loaded only when used.
LAZY_ALLOWED = {
    ("concept_diffusion/__init__.py", "concept_diffusion.api"),  # `concept_diffusion.load_run` pulls in JAX/Flax
    ("concept_diffusion/data/__init__.py", "concept_diffusion.data.stored"),  # h5py/scipy/TFDS readers
    ("concept_diffusion/data/stored.py", "concept_diffusion.data.official_files"),  # h5py, scipy.io
    ("concept_diffusion/data/prepare.py", "concept_diffusion.data.tfds_builders"),  # TensorFlow-only builders
    ("concept_diffusion/data/prepare.py", "concept_diffusion.data.tfds_source"),  # TFDS
    ("concept_diffusion/data/stored.py", "concept_diffusion.data.tfds_source"),
    ("concept_diffusion/data/tfds_source.py", "concept_diffusion.data.tfds_builders"),
    ("concept_diffusion/tools/summary.py", "concept_diffusion.tools.cli"),  # absl flags only for the CLI
}


def _imports(path: pathlib.Path):
  """[(module imported, at top level?)] of one file, relative imports resolved."""
  tree = ast.parse(path.read_text(), str(path))
  top = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, id(node) in top) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:  # `from a.b import c`: a.b.c (a module or a name in a.b)
      found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
  return found


def _graph():
  graph = {}
  for path in PACKAGE.rglob("*.py"):
    graph[str(path.relative_to(ROOT))] = [(m, top) for m, top in _imports(path)
                                          if m.startswith(("concept_diffusion", "experiments"))]
  return graph


def _part(name: str) -> str:
  """'concept_diffusion/models/unet.py' or 'concept_diffusion.models.unet' -> 'models'."""
  parts = name.replace("/", ".").removesuffix(".py").split(".")
  return parts[1] if len(parts) > 1 else parts[0]


# Imports across parts that the table below would refuse and the design allows: figures read evaluation records back
# (evaluation/records.py: the files evaluate.py writes), and nothing else of evaluation.
ALLOWED_ACROSS = {("concept_diffusion/visualize.py", "concept_diffusion.evaluation.records"),
                  # load_run gives a notebook the generation metrics encdiff-evaluate computes (the same function).
                  ("concept_diffusion/api.py", "concept_diffusion.evaluation.evaluate")}


def test_lower_parts_import_nothing_above_them():
  everything = {"models", "diffusion", "data", "train", "evaluation", "visualize", "api", "tools", "states", "workdir",
                "baselines", "interop", "checkpoint", "parallel", "config", "hardware", "perf"}
  forbidden = {
      # models may import config: it is a leaf, and the registries add an extension's fields to it.
      "models": {"train", "evaluation", "visualize", "api", "tools", "states", "workdir", "baselines",
                 "interop", "data", "checkpoint"},
      # The schema and the run's files import no model, data or training code (and so no JAX or Flax).
      "config": everything - {"config"},
      "workdir": everything - {"workdir", "config"},
      "diffusion": {"train", "evaluation", "visualize", "api", "tools", "states", "models", "data"},
      "data": {"train", "evaluation", "visualize", "api", "tools", "states", "models"},
      "evaluation": {"train", "visualize", "api", "tools", "baselines"},
      "visualize": {"train", "evaluation", "api", "tools", "baselines"},
      "train": {"evaluation", "visualize", "api", "tools", "baselines", "interop"},
      "api": {"train", "evaluation", "visualize", "tools"},
      "states": {"train", "evaluation", "visualize", "api", "tools"},
  }
  broken = []
  for path, imports in _graph().items():
    for module, _ in imports:
      if module.startswith("experiments"):
        broken.append(f"{path} imports {module}")  # nothing imports experiments/
      elif (_part(module) in forbidden.get(_part(path), ())
            and (path, module.rsplit(".", 1)[0]) not in ALLOWED_ACROSS and (path, module) not in ALLOWED_ACROSS):
        broken.append(f"{path} imports {module}")
  assert not broken, "\n".join(broken)


def test_no_function_local_import_of_the_package_but_optional_heavy_ones():
  local = sorted({(path, module) for path, imports in _graph().items() for module, top in imports if not top
                  and (path, module.rsplit(".", 1)[0]) not in LAZY_ALLOWED and (path, module) not in LAZY_ALLOWED})
  assert not local, "\n".join(f"{p}: {m}" for p, m in local)


def test_the_diffusion_train_step_is_two_files_from_the_cli():
  cli = [m for m, _ in _imports(ROOT / "experiments" / "train.py")]
  trainer = [m for m, _ in _imports(PACKAGE / "train" / "trainer.py")]
  assert "concept_diffusion.train.trainer" in cli
  assert "concept_diffusion.train.diffusion_stage" in trainer
  source = (PACKAGE / "train" / "diffusion_stage.py").read_text()
  assert "def train_step(" in source and "model.loss(" in source


def test_importing_the_package_sets_no_global_jax_flag():
  code = ("import jax; before = jax.config.jax_threefry_partitionable\n"
          "import concept_diffusion, concept_diffusion.models.encdiff, concept_diffusion.train.trainer\n"
          "assert jax.config.jax_threefry_partitionable == before, 'a global JAX flag changed at import'")
  env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_THREEFRY_PARTITIONABLE"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_project_speaks_of_itself_not_of_how_it_was_made():
  word = "ses" + "sion"  # spelled apart so that this file does not hold it
  proc = subprocess.run(["git", "grep", "-il", word, "--", ".", ":!*.png", ":!*.npy"], cwd=ROOT,
                        capture_output=True, text=True, check=False)
  assert proc.stdout.strip() == "", proc.stdout
