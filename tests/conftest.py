"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, a compilation cache, the shared runs
(tests/shared_runs.py: the tiny Shapes run, the tiny Stable Diffusion pipeline and its two runs).

Tiers: `make test` runs every test not marked `full` (the default tier, a few minutes; it trains
no run); `make test-full` runs the `full` ones (the shared runs, 1-vs-8-device, bf16 and remat
equivalence, multi-process, worker processes, command-line launches, convergence orders and
large-sample sampler statistics, second starts from the caches, FID in a run, benchmark scripts).
CI runs both.
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
# steps: 70 s with XLA's defaults, 53 s with the preset, 31 s with all three). XLA:CPU's older
# loop emitters compile a one-op program (what an eager jnp call runs; the default tier compiles
# ~1,600 of them) in 19 ms against 50 ms with the fusion emitters. Training and sampling outside
# the tests keep XLA's defaults.
if "xla_cpu_opt_preset" not in flags:
  flags += (" --xla_cpu_opt_preset=FAST_COMPILE --xla_backend_optimization_level=0"
            " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")
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
  """One uninterrupted 4-step tiny run with its eval grid, for the tests that only read it;
  trained once per session (tests/shared_runs.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import shapes  # pylint: disable=import-outside-toplevel
  from tests import shared_runs  # pylint: disable=import-outside-toplevel
  path = shared_runs.folder(tmp_path_factory, "tiny_run")
  config = shapes.get_config("tiny")
  config.data.data_dir = str(path / "tfds")
  config.mesh.data, config.mesh.fsdp = 2, 2
  workdir = str(path / "run")
  result = shared_runs.once(path, lambda: _train_tiny_run(config, workdir))
  if result is None:
    result = shared_runs.read_result(config, workdir, jax.devices()[:4])
    assert len(result.history) == config.optim.num_steps, result.history
  return TinyRun(config, workdir, result)


def _train_tiny_run(config, workdir):
  import jax  # pylint: disable=import-outside-toplevel
  from configs import specs  # pylint: disable=import-outside-toplevel
  from evaluation import sample_grid  # pylint: disable=import-outside-toplevel
  from training import loop  # pylint: disable=import-outside-toplevel
  return loop.train_and_evaluate(config, workdir, devices=jax.devices()[:4],
                                 evaluator=sample_grid.SampleGridEvaluator(specs.build(config)))


@pytest.fixture(scope="session")
def sd_pipeline(tmp_path_factory):
  """(a tiny random SD 1.x pipeline folder, a folder of captioned images), made once per session
  (tests/sd_runs.py)."""
  from tests import sd_runs, shared_runs  # pylint: disable=import-outside-toplevel
  path = shared_runs.folder(tmp_path_factory, "sd_pipeline")
  shared_runs.once(path, lambda: sd_runs.pipeline_and_images(path))
  return sd_runs.paths(path)


@pytest.fixture(scope="session")
def sd_run(tmp_path_factory, sd_pipeline):
  """2 steps fine-tuning `sd_pipeline`'s U-Net and text encoder: an sd_runs.SDRun, trained once
  per session."""
  from tests import sd_runs, shared_runs  # pylint: disable=import-outside-toplevel
  return sd_runs.run(shared_runs.folder(tmp_path_factory, "sd_run"), *sd_pipeline,
                     sd_runs.FINETUNE)


@pytest.fixture(scope="session")
def sd_lora_run(tmp_path_factory, sd_pipeline):
  """2 steps of LoRA on `sd_pipeline`: an sd_runs.SDRun, trained once per session."""
  from tests import sd_runs, shared_runs  # pylint: disable=import-outside-toplevel
  return sd_runs.run(shared_runs.folder(tmp_path_factory, "sd_lora_run"), *sd_pipeline,
                     sd_runs.LORA)
