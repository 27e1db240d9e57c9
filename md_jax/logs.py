"""Keeps library chatter (checkpoint I/O details) out of the training log."""

from __future__ import annotations

import logging

_NOISY = ("/orbax/", "/grain/", "/tensorstore")


class _LibraryInfoFilter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = record.pathname or ""
    return not any(n in path for n in _NOISY)


def quiet_libraries() -> None:
  """Drops INFO records emitted from inside Orbax/grain; warnings and errors still show."""
  f = _LibraryInfoFilter()
  for name in ("absl", ""):
    logger = logging.getLogger(name)
    logger.addFilter(f)
    for h in logger.handlers:
      h.addFilter(f)
