"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, a compilation cache, one shared run.

Tiers: `make test` runs every test not marked `full` (the default tier, a few minutes);
`make test-full` runs the `full` ones (1-vs-8-device equivalence, multi-process, convergence
orders, benchmark scripts). CI runs both.
"""
import importlib
import os
import tempfile
from typing import Any, NamedTuple

import pytest

# pytest reports an exception raised in a finalizer with tracemalloc, which it imports then; when
# the finalizer runs while TFDS imports lazily (etils), that import fails ("'LazyModule' object is
# not callable") and fails the test at hand (tests/test_data_prepare.py's TFDS source, at times).
importlib.import_module('tracemalloc')

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
# The tests compile many small programs and run each a few times: XLA's fast-compile preset and
# LLVM without its optimisation passes spend less on them (the tiny config's first 2 training
# steps: 70 s with XLA's defaults, 53 s with the preset, 31 s with all three). Training and
# sampling outside the tests keep XLA's defaults.
if "xla_cpu_opt_preset" not in flags:
  flags += (" --xla_cpu_opt_preset=FAST_COMPILE --xla_backend_optimization_level=0"
            " --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = flags.strip()
# The tiny configs compile the same programs in many tests (and in their subprocesses): a
# persistent cache, fresh for each session, compiles each once. It changes no result.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxdiff-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


class TinyRun(NamedTuple):
  config: Any  # The config it trained with (configs/shapes.py:tiny on a 2 x 2 mesh).
  workdir: str
  result: Any  # loop.TrainResult: final state and per-step losses.


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
  """One uninterrupted 4-step tiny run with its eval grid, for the tests that only read it.

  Trained once per session: the first pytest-xdist worker to need it trains it into the folder
  all workers share (under a lock); the others read its final checkpoint and metrics.jsonl back.
  """
  import filelock  # pylint: disable=import-outside-toplevel
  from configs import shapes  # pylint: disable=import-outside-toplevel
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    shared = shared.parent  # The session's folder, above each worker's own.
  path = shared / "tiny_run"
  config = shapes.get_config("tiny")
  config.data.data_dir = str(path / "tfds")
  config.mesh.data, config.mesh.fsdp = 2, 2
  workdir = str(path / "run")
  with filelock.FileLock(str(shared / "tiny_run.lock")):
    if not (path / "done").exists():
      result = _train_tiny_run(config, workdir)
      (path / "done").touch()
      return TinyRun(config, workdir, result)
  return TinyRun(config, workdir, _read_tiny_run(config, workdir))


def _train_tiny_run(config, workdir):
  import jax  # pylint: disable=import-outside-toplevel
  from configs import specs  # pylint: disable=import-outside-toplevel
  from evaluation import sample_grid  # pylint: disable=import-outside-toplevel
  from training import loop  # pylint: disable=import-outside-toplevel
  return loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4],
                                 evaluator=sample_grid.SampleGridEvaluator(specs.build(config)))


def _read_tiny_run(config, workdir):
  """The TrainResult of a finished run: its last checkpoint's state, its logged losses (every
  step is logged in the tiny config)."""
  import json  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from configs import specs  # pylint: disable=import-outside-toplevel
  from runtime import checkpoint, sharding  # pylint: disable=import-outside-toplevel
  from training import builder, loop  # pylint: disable=import-outside-toplevel
  settings = specs.build(config)
  trainer = builder.build_trainer(settings, sharding.make_mesh(settings.mesh, jax.devices()[:4]))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  state, _ = ckpt.restore(checkpoint.abstract_with_shardings(trainer.abstract, trainer.shardings))
  ckpt.close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  history = [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]
  assert len(history) == settings.optim.num_steps, history
  return loop.TrainResult(state, history)
