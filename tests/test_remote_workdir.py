"""A gs:// workdir lands in the bucket: train -> evaluate -> visualize -> resume, with a fake GCS server.

The bucket is gcp-storage-emulator (pure Python, in a thread of this process, on a free localhost port). The
console scripts run in subprocesses, as a user runs them, pointed at it by environment variables: gcsfs (what
etils.epath uses for gs:// without TensorFlow) and google-cloud-storage read STORAGE_EMULATOR_HOST; TensorStore
(Orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL and takes GOOGLE_AUTH_TOKEN_FOR_TESTING instead of credentials.
"""
from http import HTTPStatus
import json
import os
import sys
import urllib.parse
import urllib.request

import pytest

from conftest import subprocess_env

# The [test] extra installs both; without them this test fails rather than skipping the gs:// path.
import gcsfs  # noqa: F401  # pylint: disable=unused-import  (what etils.epath uses for gs:// in the subprocesses)
from gcp_storage_emulator import exceptions as emulator_exceptions
from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import objects as emulator_objects

BIN = os.path.dirname(sys.executable)
TESTS = os.path.dirname(os.path.abspath(__file__))  # tiny_blocks.py: the dataset, for the subprocesses
BUCKET = "bucket"



def _generation(storage, bucket: str, name: str | None) -> str:
  """The object's current generation, "0" when there is none (GCS's precondition for "does not exist")."""
  try:
    return str(storage.get_file_obj(bucket, name)["generation"]) if name else "0"
  except emulator_exceptions.NotFound:
    return "0"


def _with_generations(handler):
  """`handler` plus what TensorStore's GCS driver needs and gcp-storage-emulator lacks: the `ifGenerationMatch` /
  `ifGenerationNotMatch` preconditions of reads, writes and deletes (412 / 304), and the `x-goog-generation`
  header of a media download (without it TensorStore reports "Malformed StorageGeneration")."""

  def wrapped(request, response, storage, *args, **kwargs):
    bucket = request.params.get("bucket_name")
    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    match, not_match = (request.query.get(key, [None])[0] for key in ("ifGenerationMatch", "ifGenerationNotMatch"))
    if match is not None or not_match is not None:
      if int(request.get_header("content-length") or 0):
        request.data  # pylint: disable=pointless-statement  # read the upload's body even when refusing it
      current = _generation(storage, bucket, name)
      if match is not None and match != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      if not_match is not None and not_match == current:
        response.status = HTTPStatus.NOT_MODIFIED
        return None
    result = handler(request, response, storage, *args, **kwargs)
    if request.query.get("alt") == ["media"] or handler is emulator_objects.download:
      if response.status == HTTPStatus.OK or response.status == HTTPStatus.PARTIAL_CONTENT:
        response["x-goog-generation"] = _generation(storage, bucket, name)
    return result

  wrapped.with_generations = True
  return wrapped


def _patch_emulator() -> None:
  """Wraps every route's handler once (the route table's dicts are module state of the emulator)."""
  for _, handlers in emulator.HANDLERS:
    for method, handler in list(handlers.items()):
      if not getattr(handler, "with_generations", False):
        handlers[method] = _with_generations(handler)


@pytest.fixture
def fake_gcs():
  """(endpoint URL, server) of an empty in-memory bucket `BUCKET` on a free port."""
  _patch_emulator()
  server = emulator.create_server("localhost", 0, in_memory=True, default_bucket=BUCKET)
  server.start()
  try:
    host, port = server._api._httpd.server_address[:2]  # pylint: disable=protected-access  # port 0: the OS picks
    yield f"http://localhost:{port}", server
  finally:
    server.stop()


def _objects(endpoint: str) -> list[str]:
  """Every object name in the bucket (JSON API list, all pages)."""
  names, token = [], ""
  while True:
    query = urllib.parse.urlencode({"pageToken": token} if token else {})
    with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}/o?{query}", timeout=30) as response:
      page = json.load(response)
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken")
    if not token:
      return sorted(names)


def _read(endpoint: str, name: str) -> bytes:
  url = f"{endpoint}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
  with urllib.request.urlopen(url, timeout=30) as response:
    return response.read()


def _run(args, cwd, env):
  import subprocess  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([os.path.join(BIN, args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
  return proc


def test_a_gs_workdir_lands_in_the_bucket_and_resumes_from_it(tmp_path, cache_dir, fake_gcs):
  endpoint, _ = fake_gcs
  cwd, local_tmp = tmp_path / "cwd", tmp_path / "tmp"
  for folder in (cwd, local_tmp):
    folder.mkdir()
  env = subprocess_env(cache_dir, 1, STORAGE_EMULATOR_HOST=endpoint, TENSORSTORE_GCS_HTTP_URL=endpoint,
                       GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy", TMPDIR=str(local_tmp),
                       # gcsfs >= 2025 asks Google's storage-control API (real credentials) whether a bucket is
                       # hierarchical, and logs a warning per path when it cannot; the emulator has plain buckets.
                       GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                       PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  workdir = f"gs://{BUCKET}/run"
  train = ["encdiff-train", "--config=smoke", f"--workdir={workdir}", "--config.extensions=('tiny_blocks',)",
           "--config.data.name=tiny_blocks", "--config.first_stage.kind=none", "--config.train.num_steps=1",
           "--config.train.log_every=1", "--config.train.checkpoint_every=1", "--config.sample.final_figures=False"]

  _run(train, cwd, env)
  objects = _objects(endpoint)
  assert "run/config.json" in objects and "run/metrics.jsonl" in objects, objects
  assert any(name.startswith("run/diffusion/1/") for name in objects), objects
  assert "run/lock.json" not in objects  # released at the end
  assert any(name.startswith("run/tensorboard/events.out.tfevents.") for name in objects), objects

  evaluated = _run(["encdiff-evaluate", f"--workdir={workdir}", "--metrics=mig"], cwd, env)
  assert "tiny_blocks step 1" in evaluated.stdout
  assert json.loads(_read(endpoint, "run/eval/metrics_1.json"))["step"] == 1
  assert "run/eval/codes_1.npy" in _objects(endpoint)

  _run(["encdiff-visualize", f"--workdir={workdir}"], cwd, env)  # reads codes_1.npy back for the traversals
  figures = {name.rsplit("/", 1)[1] for name in _objects(endpoint) if name.startswith("run/figures/")}
  assert {"swap_grid.png", "reconstructions.png", "traversals.png", "loss_curves.png"} <= figures, figures
  assert _read(endpoint, "run/figures/swap_grid.png").startswith(b"\x89PNG")

  resumed = _run(train[:6] + ["--config.train.num_steps=2"] + train[7:], cwd, env)
  objects = _objects(endpoint)
  assert any(name.startswith("run/diffusion/2/") for name in objects), objects
  records = [json.loads(line) for line in _read(endpoint, "run/metrics.jsonl").decode().splitlines()]
  # One record per step: the second run went on from step 1 (a fresh start would log step 1 again), and
  # the records of the first run, of the evaluation-free visualisation and of the second all survived the
  # read-extend-write appends.
  assert [r["step"] for r in records if r["stage"] == "diffusion"] == [1, 2], (records, resumed.stderr[-3000:])
  assert any(r["stage"] == "figures" for r in records)
  assert "run/lock.json" not in objects
  assert len([n for n in objects if n.startswith("run/tensorboard/events.out.tfevents.")]) >= 3  # one per writer

  # Nothing on local disk: the working directory stays empty, temporary files were removed, no "gs:" folder.
  assert not list(cwd.iterdir())
  assert not list(local_tmp.iterdir()), list(local_tmp.iterdir())
  assert not [p for p in tmp_path.rglob("*") if "gs:" in p.name]
