"""The CPU host, set up by the entry points before jax starts (no jax import here).

Two settings, both for runs whose only backend is the CPU (no accelerator plugin installed, or
JAX_PLATFORMS=cpu); on accelerators nothing changes.

Memory kept between steps. XLA:CPU allocates each execution's temporary buffer (1.7 GB for the
base config's train step at batch 32) with malloc on its worker threads and frees it at the end.
glibc serves those threads from per-thread arenas whose heaps are at most 64 MiB, so a large
block is always a fresh mmap, returned with munmap when freed, and the next step touches every
page again: about 420,000 minor page faults and 1.5 s of system time a step there, a sixth of
the CPU (BENCHMARKS.md). `keep_freed_memory` makes every thread use the main heap
(M_ARENA_MAX=1), serves large blocks from it instead of mmap (M_MMAP_MAX=0) and never gives its
top back to the kernel (M_TRIM_THRESHOLD at its maximum), so after the first steps a step maps
nothing new: 0 faults a step. The process keeps its peak heap, as PyTorch's caching allocator
does. glibc's variables in the environment (MALLOC_ARENA_MAX, ...) are not enough: they cannot
lift the arenas' 64 MiB limit. JAXDIFF_KEEP_MEMORY=off leaves malloc as it is.

Every core by default. A CPU run gets one XLA CPU device per core, up to the largest count the
global batch splits over (`cpu_devices`): the train step runs data-parallel over them (0.80-0.88x
the step time of one device with every thread on this 2-core machine, BENCHMARKS.md). A
pretrained model keeps one device, since a data-parallel mesh copies the weights and optimiser
to every device. `sample.py` on a trained workdir does the same for the batch of its sampling
program, which `sampling.generate` splits over the devices (0.55x the time of both devices
sampling the whole batch, 0.67x of one device alone, BENCHMARKS.md). Not applied when XLA_FLAGS
already sets the device count, nor in a multi-process job (its launcher sets it).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os

from cluster.contract import ENV_COORDINATOR, ENV_NUM_PROCESSES, OFF_WORDS

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
ENV_KEEP_MEMORY = 'JAXDIFF_KEEP_MEMORY'
# Distributions that give jax a backend other than the CPU.
_ACCELERATOR_PLUGINS = ('jax-cuda', 'jax_cuda', 'libtpu', 'jax-rocm', 'jax_rocm', 'jax-metal')
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def cores() -> int:
  """The cores this process may run on (its affinity mask, e.g. a container's or taskset's)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def cpu_only(environ=os.environ) -> bool:
  """Whether jax will run on the CPU alone: JAX_PLATFORMS says only cpu, or it is unset and no
  accelerator plugin is installed."""
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms == 'cpu'
  names = (d.metadata['Name'] or '' for d in importlib.metadata.distributions())
  return not any(n.lower().startswith(_ACCELERATOR_PLUGINS) for n in names)


def cpu_devices(num_cores: int, batch: int, grad_accum: int = 1,
                mesh: tuple[int, int, int] = (-1, 1, 1)) -> int:
  """The XLA CPU devices for a train step: the most, up to `num_cores`, that the `mesh` (data,
  fsdp, tensor; one of them -1: the rest of the devices) takes and whose data-parallel part
  (data x fsdp) the global `batch` splits over in `grad_accum` micro-batches
  (configs.validation.check_mesh's rule). The mesh's fixed size when no count is (validation
  then names the field)."""
  fixed = 1
  for size in mesh:
    fixed *= size if size > 0 else 1
  if -1 not in mesh:
    return fixed
  per_step = batch // grad_accum if batch % grad_accum == 0 else batch
  best = fixed
  for n in range(fixed, num_cores + 1, fixed):
    data, fsdp, _ = (size if size > 0 else n // fixed for size in mesh)
    if per_step % (data * fsdp) == 0:
      best = n
  return best


def set_device_count(n: int, environ=os.environ) -> bool:
  """Adds the device-count flag to XLA_FLAGS unless it is there; whether it did."""
  flags = environ.get('XLA_FLAGS', '')
  if DEVICE_COUNT_FLAG in flags:
    return False
  environ['XLA_FLAGS'] = f'{flags} {DEVICE_COUNT_FLAG}={n}'.strip()
  return True


def keep_freed_memory(environ=os.environ) -> bool:
  """glibc malloc: one arena, large blocks from the heap, nothing trimmed (module docstring);
  whether it applied. Call before any thread allocates (before jax starts)."""
  if environ.get(ENV_KEEP_MEMORY, '').strip().lower() in OFF_WORDS:
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc (macOS, musl): nothing to do.
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is its maximum.
  return bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
              and mallopt(_M_TRIM_THRESHOLD, -1))


def _multi_process(environ) -> bool:
  return bool(environ.get(ENV_COORDINATOR)) or int(environ.get(ENV_NUM_PROCESSES) or 1) > 1


def setup(config=None, environ=os.environ, *, batch: int | None = None) -> str:
  """Before jax starts: on a CPU-only run, keeps freed memory and, given a training `config` (or
  the `batch` of a sampling program on a data-parallel mesh), one XLA device per core as
  `cpu_devices` allows. A line for the log ('' if nothing applied)."""
  if not cpu_only(environ):
    return ''
  done = []
  if keep_freed_memory(environ):
    done.append('malloc keeps freed memory')
  n = None
  if config is not None and not config.model.get('pretrained'):
    mesh = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    n = cpu_devices(cores(), config.data.global_batch_size, config.optim.grad_accum_steps, mesh)
  elif config is None and batch is not None:
    n = cpu_devices(cores(), batch)
  if n is not None and not _multi_process(environ):
    if set_device_count(n, environ):
      done.append(f'{n} XLA CPU device{"s" * (n != 1)} on {cores()} cores')
  return ', '.join(done)
