"""SIGINT and SIGTERM from the first line of a command to the last.

Outside training a signal stops the command at once (`Interrupted`, raised where the main thread is, so every
`finally` runs: checkpoint managers close, temporary files go). Inside the training loop (`deferred()`) it is
noted instead; the loop saves at the next step boundary and then raises `Interrupted` with the saved step. A second
Ctrl-C inside the loop stops at once (the last finished checkpoint is intact: Orbax renames a save into place only
when it is complete). The console scripts turn `Interrupted` into one line and an exit code: 130 for SIGINT; for
SIGTERM (a scheduler's preemption) 0 once the step is saved, so the job is simply restarted, else 143.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """A SIGINT/SIGTERM ended the command; `saved_step` is the checkpoint written for it (None: nothing saved)."""

  def __init__(self, signum: int, saved_step: Optional[int] = None, where: str = ""):
    self.signum, self.saved_step, self.where = signum, saved_step, where
    name = signal.Signals(signum).name
    if saved_step is None:
      text = f"interrupted ({name}); nothing to save at this point, the last finished checkpoint is intact"
    else:
      text = f"interrupted ({name}); saved step {saved_step}{f' to {where}' if where else ''}"
    super().__init__(f"{text}. Run the same command to resume.")

  @property
  def exit_code(self) -> int:
    if self.signum == signal.SIGINT:
      return 130
    return 0 if self.saved_step is not None else 128 + self.signum


def _raise_now(signum, frame) -> None:
  del frame
  raise Interrupted(signum)


def install() -> None:
  """Every SIGINT/SIGTERM from now on raises `Interrupted` (the console scripts call this first)."""
  if threading.current_thread() is threading.main_thread():
    for sig in SIGNALS:
      signal.signal(sig, _raise_now)


class deferred:  # pylint: disable=invalid-name
  """Within the block a SIGINT/SIGTERM only sets `requested` (its number); the loop polls it at step boundaries.

  Only in the main thread of a single process: across processes every host must stop at the same step, which the
  training loop agrees on through JAX's preemption sync point instead.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.requested: Optional[int] = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> "deferred":
    if self.enabled:
      self._previous = {sig: signal.signal(sig, self._note) for sig in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _note(self, signum, frame) -> None:
    del frame
    if self.requested == signal.SIGINT and signum == signal.SIGINT:
      raise Interrupted(signum)  # a second Ctrl-C: the user does not want to wait for the save
    self.requested = signum
