"""The project's own error for what the user fixes: a bad config value, a missing file, a busy workdir.

The console scripts (tools/cli.py) print a UserError as one line and exit 2; any other exception keeps its
traceback, because it is a bug to report. A subclass of ValueError, so callers that catch ValueError still do.
"""


class UserError(ValueError):
  """A message that says what to do, for whoever runs the command."""
