"""What an entry point's console shows: our progress lines, not the libraries' INFO chatter."""

import dataclasses
import functools
import logging as pylogging
import os
import shutil
import sys
import traceback
from typing import Any, Callable

from absl import flags
from absl import logging

from runtime import workdir as paths


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of orbax and TFDS, and the warnings that are not the user's to act on
  (orbax's read-only notices, TFDS's builder config and OpenCV notes). Errors always show."""
  NOISY = ('/orbax/', '/tensorflow_datasets/', '/etils/')
  NOTICES = ('read_only=True, setting save_interval_steps', 'Given directory is read only',
             'Using custom data configuration', 'OpenCV is not installed',
             'Metadata file does not exist')

  def filter(self, record):
    if record.levelno >= pylogging.ERROR:
      return True
    if record.levelno >= pylogging.WARNING:
      return not any(n in str(record.msg) for n in self.NOTICES)
    return not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs():
  """Keeps the console to our own progress lines; call once from an entry point."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def quiet_info() -> None:
  """The console shows warnings and errors only (progress bars and summaries are printed)."""
  logging.get_absl_handler().setLevel(pylogging.WARNING)


class _LogFile(pylogging.FileHandler):
  """`log_to_file`'s handler (a class of its own, so `worker_logging` repeats ours only)."""

  def __init__(self, path: str):
    super().__init__(path)  # Appends: worker processes add their lines to the same file.
    self.setFormatter(pylogging.Formatter(
        '%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s', '%m%d %H:%M:%S'))
    self.setLevel(pylogging.INFO)


def log_to_file(path: str, *, verbose: bool = False) -> None:
  """Every log line (INFO and up, libraries included) to `path`; the console shows warnings and
  errors only (all of it with `verbose`), next to the progress bars and the final summary."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root = pylogging.getLogger()
  root.addHandler(_LogFile(path))
  root.setLevel(min(root.level or pylogging.INFO, pylogging.INFO))
  logging.set_verbosity(logging.INFO)
  if not verbose:
    quiet_info()


@dataclasses.dataclass(frozen=True)
class _LogSetup:
  """What an entry point set up in this process, as `worker_logging` repeats it."""
  absl_console: bool  # absl's handler is on the root logger (app.run puts it there).
  console_level: int  # Its level (`quiet_info`: WARNING).
  quiet_libraries: bool  # `quiet_library_logs` filters it.
  files: tuple[str, ...]  # `log_to_file`'s files (absolute paths).
  root_level: int
  verbosity: int


def worker_logging() -> Callable[[], None]:
  """A picklable function that sets a worker process's logging up as this process's is.

  grain starts its workers by spawn: they begin with Python's defaults (absl lines print as
  `WARNING:absl:...` and reach no log file), and grain formats absl's handler as '[k] message'.
  """
  root = pylogging.getLogger()
  handler = logging.get_absl_handler()
  setup = _LogSetup(
      absl_console=handler in root.handlers, console_level=handler.level,
      quiet_libraries=any(isinstance(f, _QuietLibraries) for f in handler.filters),
      files=tuple(h.baseFilename for h in root.handlers if isinstance(h, _LogFile)),
      root_level=root.level, verbosity=logging.get_verbosity())
  return functools.partial(_repeat_log_setup, setup)


def _repeat_log_setup(setup: _LogSetup) -> None:
  root = pylogging.getLogger()
  if setup.absl_console:
    if not flags.FLAGS.is_parsed():  # Else absl's handler adds 'Logging before flag parsing'.
      flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    handler = logging.get_absl_handler()
    handler.setFormatter(logging.PythonFormatter())  # Not grain's '[k] message'.
    handler.setLevel(setup.console_level)
    if setup.quiet_libraries:
      quiet_library_logs()
  for path in setup.files:
    root.addHandler(_LogFile(path))
  logging.set_verbosity(setup.verbosity)
  root.setLevel(setup.root_level)  # After set_verbosity, which sets it when absl's handler is on.


def _drop_closed_loop_errors(previous):
  """An unraisable-exception hook that drops 'Event loop is closed': tensorstore reads of a
  checkpoint whose restore already failed complete after orbax closed its event loop, and each
  printed a traceback from a background thread."""
  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    previous(unraisable)
  hook.drops_closed_loop_errors = True
  return hook


class _OrphanedRestoreTasks(pylogging.Filter):
  """Drops asyncio's '<Task|Future|_GatheringFuture> exception was never retrieved' for orbax's
  reads of a checkpoint whose restore already failed (logged whenever the task or future is
  garbage-collected; a task carries orbax frames, a bare future only tensorstore's error text)."""

  _MESSAGE = ' exception was never retrieved'  # asyncio: f'{type(future).__name__}' + this.

  def filter(self, record):
    first_line = str(record.msg).split('\n', 1)[0]
    if not first_line.endswith(self._MESSAGE) or not record.exc_info:
      return True
    _, value, tb = record.exc_info
    frames = traceback.extract_tb(tb) if tb is not None else []
    from_orbax = any('/orbax/' in f.filename or '/tensorstore/' in f.filename for f in frames)
    return not (from_orbax or 'tensorstore_spec' in str(value))


def quiet_closed_loop_errors():
  """No background-thread tracebacks after a failed checkpoint restore (runtime/checkpoint.py)."""
  if not getattr(sys.unraisablehook, 'drops_closed_loop_errors', False):
    sys.unraisablehook = _drop_closed_loop_errors(sys.unraisablehook)
  asyncio_logger = pylogging.getLogger('asyncio')
  if not any(isinstance(f, _OrphanedRestoreTasks) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_OrphanedRestoreTasks())


def quiet_library_noise():
  """Library logs as `quiet_library_logs`, and no background-thread tracebacks of a failed restore."""
  quiet_library_logs()
  quiet_closed_loop_errors()


# What a user can cause (a bad flag, config value, file or workdir; a diverging run): one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError)


def one_line(e: BaseException) -> str:
  return ' '.join(str(e).split()) or type(e).__name__


def run_or_exit(fn: Callable[[], Any], *, verbose: bool = False, log_dir: str | None = None) -> Any:
  """`fn()`; an error a user can cause exits 1 with one `error: ...` line on stderr.

  The traceback goes to LOG_DIR/error.log (when `log_dir` is given) and, with `verbose`, to the
  console as well (the error is re-raised). Other exceptions (bugs) propagate with their traceback.
  """
  try:
    return fn()
  except USER_ERRORS as e:
    if log_dir:
      try:
        os.makedirs(log_dir, exist_ok=True)
        with open(paths.error_log(log_dir), 'a') as f:
          traceback.print_exc(file=f)
          f.write(f'error: {one_line(e)}\n')
      except OSError:
        pass  # An unwritable workdir: the console line is still shown.
    if verbose:
      raise
    sys.stderr.flush()
    sys.exit(f'error: {one_line(e)}')


def progress(total: int, desc: str, unit: str, **kwargs):
  """A tqdm bar on stderr, as wide as the terminal (100 x 24 when it reports no size: in a pty of
  size 0 x 0 tqdm hid its bar)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  size = shutil.get_terminal_size((100, 24))
  return tqdm(total=total, desc=desc, unit=unit, ncols=min(size.columns or 100, 120),
              nrows=size.lines or 24, **kwargs)
