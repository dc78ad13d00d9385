"""Training runs made once per test session and shared by the tests that only read them.

The first pytest-xdist worker to need a run makes it in the folder all workers share (under a
lock, then a `done` marker) and keeps what training returned; the others read the run back from
its workdir (its final checkpoint and metrics.jsonl). The session fixtures are in
tests/conftest.py; tests must not write into a shared run's folders (copy them first).
"""
import json
import os
import pathlib
from typing import Any, Callable


def folder(tmp_path_factory, name: str) -> pathlib.Path:
  """The folder NAME in the session's tmp folder, the one all xdist workers share."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    shared = shared.parent  # The session's folder, above each worker's own.
  return shared / name


def once(path: pathlib.Path, make: Callable[[], Any]):
  """What `make()` returned, where this is the first call for `path` in the session (`make`
  fills `path`); None where another worker or an earlier call made it."""
  import filelock  # pylint: disable=import-outside-toplevel
  with filelock.FileLock(f'{path}.lock'):
    if not (path / 'done').exists():
      made = make()
      (path / 'done').touch()
      return made
  return None


def history(workdir: str) -> list:
  """(step, loss) of every logged training step in WORKDIR/metrics.jsonl, over all its launches
  (the tiny configs log every step)."""
  from runtime import workdir as layout  # pylint: disable=import-outside-toplevel
  with open(layout.metrics(workdir)) as f:
    rows = [json.loads(line) for line in f]
  return [(row['step'], row['train/loss']) for row in rows if 'train/loss' in row]


def read_result(config, workdir: str, devices):
  """The loop.TrainResult of a finished run of `config` on `devices`: its last checkpoint's
  state (on the same mesh) and its logged losses."""
  from configs import specs  # pylint: disable=import-outside-toplevel
  from runtime import checkpoint, sharding  # pylint: disable=import-outside-toplevel
  from training import builder, loop  # pylint: disable=import-outside-toplevel
  settings = specs.build(config)
  trainer = builder.build_trainer(settings, sharding.make_mesh(settings.mesh, devices))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  state, _ = ckpt.restore(checkpoint.abstract_with_shardings(trainer.abstract, trainer.shardings))
  ckpt.close()
  return loop.TrainResult(state, history(workdir))
