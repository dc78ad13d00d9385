"""What an entry point's console shows: our progress lines, not the libraries' INFO chatter."""

import logging as pylogging

from absl import logging


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax and TFDS (their warnings and errors still show)."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/etils/')

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs():
  """Keeps the console to our own progress lines; call once from an entry point."""
  logging.get_absl_handler().addFilter(_QuietLibraries())
