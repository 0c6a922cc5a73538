"""One training per workdir: W/lock.json names the process that holds it ({host, pid, started})."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from typing import Iterator

from etils import epath

from concept_diffusion.workdir.layout import LOCK_FILE, ensure_workdir
from concept_diffusion.workdir.storage import storage_for


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
  """Holds W/lock.json for the block: a second training on the workdir stops at once, naming the holder. A lock
  left by a dead process on this host is taken over with a warning. On a shared filesystem only process 0 takes it
  (`enabled`), so the hosts of one pod run do not lock each other out.

  The file is created only where none is (storage.create_exclusive): O_EXCL locally; on a remote workdir
  (gs://...) a check, a write and a read-back, which leaves a race between two starts within about a second. It
  guards against the common mistake (a second command on a workdir in use, minutes or days later), not against two
  starts in the same second.
  """
  if not enabled:
    yield
    return
  ensure_workdir(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  storage = storage_for(path)
  mine = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  while not storage.create_exclusive(path, json.dumps(mine)):
    holder = _read_lock(path)
    if holder is None:  # released between our attempt and this read: try again
      continue
    if not _left_by_dead_process(holder, mine, path):
      raise _in_use(workdir, path, holder)
    with contextlib.suppress(FileNotFoundError):
      epath.Path(path).unlink()
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      if _read_lock(path) == mine:
        epath.Path(path).unlink()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _left_by_dead_process(holder: dict, mine: dict, path: str) -> bool:
  """Whether the lock `holder` is a process of this host that is gone (warns that it is taken over)."""
  if holder.get("host") == mine["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
    print(f"warning: {path} was left by process {holder['pid']} (started {holder.get('started', '?')}), which "
          "is gone; taking the workdir over.", file=sys.stderr)
    return True
  return False


def _in_use(workdir: str, path: str, holder: dict) -> WorkdirInUse:
  who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
         if holder else "an unknown process")
  return WorkdirInUse(f"{workdir} is in use by {who} (its lock: {path}). Wait for that run to finish or stop it, "
                      "or use another --workdir. If that process is gone (e.g. its machine crashed), delete "
                      f"{path}.")


def _read_lock(path: str) -> dict | None:
  """The holder recorded in a lock file; None when there is none, {} when it cannot be read (being written this
  instant, or damaged: held by an unknown process)."""
  try:
    holder = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}
