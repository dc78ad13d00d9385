"""Process set-up for 1..N JAX processes: environment detection, jax.distributed, failure watchdog.

`initialize()` is the one code path for every cluster. It finds out where it runs, in order:

  explicit    arguments / `config.distributed` / JAXDIFF_COORDINATOR, JAXDIFF_NUM_PROCESSES,
              JAXDIFF_PROCESS_ID (named in `cluster.contract`, set by `launch.local`);
              `kubernetes` when the process id comes from an Indexed Job (JOB_COMPLETION_INDEX,
              as in `launch.k8s` manifests).
  slurm       SLURM_JOB_ID, SLURM_PROCID, SLURM_NTASKS (an `srun` step, as `launch.slurm` writes).
  tpu         a Cloud TPU VM (TPU PCI devices or TPU_WORKER_* variables): jax auto-detects the pod.
  single      anything else: jax.distributed.initialize is not called at all.

Failure handling (measured on jax 0.10.2, see docs/launch.md): jax's coordination service aborts
every process when one stops heartbeating, but only after `heartbeat_timeout_seconds` (100 s by
default), and a process that dies of a Python exception waits in jax's shutdown barrier while its
peers hang in their next collective: the job hangs for `shutdown_timeout_seconds` (300 s) and the
error then blames the healthy process. So a multi-process run also starts a `Watchdog` thread that
beats through the coordination service's key-value store, publishes an uncaught exception before
its process exits, and ends every other process with `EXIT_PEER_FAILED` and a message naming the
lost or failed process within `heartbeat_timeout_s` seconds (jax's own heartbeat stays on as a
backstop, at twice our timeout plus `_BACKSTOP_S`). One small RPC per second per process: no measurable cost.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import os
import re
import sys
import time
from typing import Any, Callable, Mapping

from absl import logging

from cluster.contract import (ENV_COORDINATOR, ENV_COORDINATOR_PORT, ENV_HEARTBEAT_TIMEOUT,
                              ENV_NUM_PROCESSES, ENV_PROCESS_ID, ENV_WATCHDOG, OFF_WORDS)
from cluster.watchdog import Watchdog, flush

_BACKSTOP_S = 15  # jax's own heartbeat timeout is twice ours plus this (it can fire early).
_TPU_ENV = ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS',
            'TPU_WORKER_ID')


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """The `config.distributed` section (defaults: configs/base.py); empty values mean "detect"."""
  coordinator_address: str  # host:port of process 0; '' = from the environment.
  num_processes: int  # 0 = from the environment.
  process_id: int  # -1 = from the environment.
  heartbeat_timeout_s: float  # A process silent this long is declared lost.
  initialization_timeout_s: int  # How long processes wait for each other at start-up.
  shutdown_timeout_s: int  # How long a finished process waits for the others at exit.
  watchdog: bool  # Run the heartbeat/failure watchdog thread (multi-process only).
  watchdog_interval_s: float  # Seconds between two watchdog rounds.

  def __post_init__(self):
    if not self.heartbeat_timeout_s > 0:
      raise ValueError(f'distributed.heartbeat_timeout_s must be > 0, got '
                       f'{self.heartbeat_timeout_s}.')
    if not 0 < self.watchdog_interval_s < self.heartbeat_timeout_s:
      raise ValueError(f'distributed.watchdog_interval_s must be in (0, heartbeat_timeout_s='
                       f'{self.heartbeat_timeout_s}), got {self.watchdog_interval_s}.')


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do; a pure function of the environment (see `detect`)."""
  environment: str  # 'single', 'explicit', 'kubernetes', 'slurm' or 'tpu'.
  num_processes: int | None = 1  # None: jax auto-detects (TPU).
  process_id: int | None = 0
  coordinator_address: str | None = None
  local_device_ids: tuple[int, ...] | None = None  # None: all visible devices.

  @property
  def multi_process(self) -> bool:
    return self.num_processes != 1


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """This process's place in the job."""
  process_index: int
  process_count: int
  local_devices: tuple[Any, ...]
  device_count: int
  environment: str
  coordinator_address: str | None = None

  @property
  def local_device_count(self) -> int:
    return len(self.local_devices)

  @property
  def is_main(self) -> bool:
    return self.process_index == 0


# ----------------------------------------------------------------------------- settings


def with_environment(spec: DistributedSpec,
                     env: Mapping[str, str] = os.environ) -> DistributedSpec:
  """`spec` with what a launcher or a user set for one job in the environment (it wins)."""
  changes: dict[str, Any] = {}
  if ENV_HEARTBEAT_TIMEOUT in env:
    changes['heartbeat_timeout_s'] = _number(env[ENV_HEARTBEAT_TIMEOUT], ENV_HEARTBEAT_TIMEOUT)
  if ENV_WATCHDOG in env:
    changes['watchdog'] = env[ENV_WATCHDOG].strip().lower() not in OFF_WORDS
  return dataclasses.replace(spec, **changes)


def _number(text: str, name: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise ValueError(f'{name}={text!r} is not a number.') from None


def _int(text: str, name: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'{name}={text!r} is not an integer.') from None


# ----------------------------------------------------------------------------- detection


def detect(env: Mapping[str, str], settings: DistributedSpec | None = None,
           tpu_present: bool = False) -> Plan:
  """Which environment this process runs in and the jax.distributed arguments it implies
  (`settings`: the distributed section; None: the environment alone)."""
  coordinator = (settings and settings.coordinator_address) or env.get(ENV_COORDINATOR, '')
  count = (settings and settings.num_processes) or (
      _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else 0)
  if coordinator or count:
    return _explicit_plan(env, settings, coordinator, count)
  if all(k in env for k in ('SLURM_JOB_ID', 'SLURM_PROCID', 'SLURM_NTASKS')):
    return _slurm_plan(env)
  if tpu_present or any(k in env for k in _TPU_ENV):
    hosts = env.get('TPU_WORKER_HOSTNAMES') or env.get('TPU_PROCESS_ADDRESSES')
    if hosts is not None and len(hosts.split(',')) == 1 and 'MEGASCALE_NUM_SLICES' not in env:
      return Plan('tpu')
    return Plan('tpu', num_processes=None, process_id=None)
  if 'JOB_COMPLETION_INDEX' in env:
    raise ValueError(
        f'Kubernetes Indexed Job detected (JOB_COMPLETION_INDEX={env["JOB_COMPLETION_INDEX"]}) but '
        f'{ENV_COORDINATOR} and {ENV_NUM_PROCESSES} are not set, so the pods cannot find each '
        f'other. Generate the manifest with `python -m launch.k8s` (docs/launch.md) or set them; '
        f'for a single pod set {ENV_NUM_PROCESSES}=1.')
  return Plan('single')


def _explicit_plan(env: Mapping[str, str], settings: DistributedSpec | None, coordinator: str,
                   count: int) -> Plan:
  """Coordinator, process count and id given by flags/config or JAXDIFF_* variables."""
  kind = 'explicit'
  if settings is not None and settings.process_id >= 0:
    pid: int | None = settings.process_id
  elif env.get(ENV_PROCESS_ID):
    pid = _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
  elif env.get('JOB_COMPLETION_INDEX'):
    pid = _int(env['JOB_COMPLETION_INDEX'], 'JOB_COMPLETION_INDEX')
  else:
    pid = None
  if 'JOB_COMPLETION_INDEX' in env or 'KUBERNETES_SERVICE_HOST' in env:
    kind = 'kubernetes'
  if count < 1:
    raise ValueError(f'{ENV_NUM_PROCESSES} (config.distributed.num_processes) must be set to the '
                     f'number of processes (>= 1) when {ENV_COORDINATOR}={coordinator!r} is set.')
  if count == 1:
    return Plan(kind)
  if not coordinator or not re.fullmatch(r'.+:\d+', coordinator):
    raise ValueError(f'{ENV_COORDINATOR} (config.distributed.coordinator_address) must be '
                     f'host:port of process 0 for a {count}-process run, got {coordinator!r}.')
  if pid is None:
    raise ValueError(f'{ENV_PROCESS_ID} (config.distributed.process_id) must be set for a '
                     f'{count}-process run (0 .. {count - 1}).')
  if not 0 <= pid < count:
    raise ValueError(f'{ENV_PROCESS_ID}={pid} must be in [0, {count}) '
                     f'({ENV_NUM_PROCESSES}={count}).')
  return Plan(kind, count, pid, coordinator)


def slurm_first_host(nodelist: str) -> str:
  """First host of a SLURM node list: 'gpu[007-009,012],cpu1' -> 'gpu007'."""
  m = re.match(r'([^,\[]+)(?:\[([^\]]+)\])?', nodelist.strip())
  if not m or not m.group(1):
    raise ValueError(f'Cannot parse the SLURM node list {nodelist!r}.')
  prefix, ranges = m.group(1), m.group(2)
  if ranges is None:
    return prefix
  return prefix + re.split(r'[,-]', ranges)[0]


def _slurm_plan(env: Mapping[str, str]) -> Plan:
  count = _int(env['SLURM_NTASKS'], 'SLURM_NTASKS')
  if count == 1:
    return Plan('slurm')
  nodelist = env.get('SLURM_STEP_NODELIST') or env.get('SLURM_JOB_NODELIST') or env.get(
      'SLURM_NODELIST')
  if not nodelist:
    raise ValueError('SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: run the '
                     'training command under `srun` (launch.slurm does).')
  job_id = _int(env['SLURM_JOB_ID'], 'SLURM_JOB_ID')
  port = env.get(ENV_COORDINATOR_PORT) or str(49152 + job_id % 16384)
  nodes = _int(env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_NNODES') or
               env.get('SLURM_JOB_NUM_NODES') or '1', 'SLURM_NNODES')
  local_ids = None
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d]
  if (count > nodes and len(visible) > 1 and 'SLURM_GPUS_PER_TASK' not in env and
      'SLURM_LOCALID' in env):  # Several tasks see all of a node's GPUs: one each, as jax does.
    local_ids = (_int(env['SLURM_LOCALID'], 'SLURM_LOCALID'),)
  return Plan('slurm', count, _int(env['SLURM_PROCID'], 'SLURM_PROCID'),
              f'{slurm_first_host(nodelist)}:{port}', local_ids)


def tpu_present() -> bool:
  """True on a Cloud TPU VM: TPU chips on the PCI bus (jax's own probe), else /dev/accel*."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):
    return bool(glob.glob('/dev/accel*'))


def _cpu_platform(jax_platforms: str | None) -> bool:
  """Whether jax will run on the CPU backend (then collectives go through gloo)."""
  if jax_platforms:
    return jax_platforms.split(',')[0].strip() == 'cpu'
  return not (os.path.exists('/dev/nvidia0') or os.path.exists('/dev/kfd') or tpu_present())


# ----------------------------------------------------------------------------- initialize


@dataclasses.dataclass
class _State:
  info: ProcessInfo
  watchdog: Watchdog | None = None
  previous_excepthook: Callable[..., Any] | None = None


_STATE: _State | None = None


def initialize(spec: DistributedSpec) -> ProcessInfo:
  """Joins this process to the job (a no-op for a single process); call before any JAX work.

  `spec`: the run's `distributed` section; the environment overrides it (`with_environment`).
  Idempotent.
  """
  global _STATE
  if _STATE is not None:
    return _STATE.info
  settings = with_environment(spec)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.distributed.is_initialized():  # Someone called jax.distributed.initialize directly.
    return _info(jax, 'preinitialized', None)
  plan = detect(os.environ, settings, tpu_present=tpu_present())
  if not plan.multi_process:
    info = _info(jax, plan.environment, None)
    logging.info('jaxdiff.distributed: %s environment, single process, %d local devices.',
                 plan.environment, info.local_device_count)
    return info
  if _cpu_platform(os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('jaxdiff.distributed: %s environment, process %s of %s, coordinator %s.',
               plan.environment, plan.process_id, plan.num_processes,
               plan.coordinator_address or '(auto)')
  jax.distributed.initialize(
      coordinator_address=plan.coordinator_address,
      num_processes=plan.num_processes,
      process_id=plan.process_id,
      local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
      cluster_detection_method=None if plan.num_processes is None else 'deactivate',
      initialization_timeout=int(settings.initialization_timeout_s),
      heartbeat_timeout_seconds=2 * int(settings.heartbeat_timeout_s) + _BACKSTOP_S,
      shutdown_timeout_seconds=int(settings.shutdown_timeout_s))
  info = _info(jax, plan.environment, plan.coordinator_address)
  _STATE = _State(info)
  if settings.watchdog and info.process_count > 1:
    _start_watchdog(_STATE, settings)
  logging.info('jaxdiff.distributed: joined as process %d of %d, %d local / %d global devices.',
               info.process_index, info.process_count, info.local_device_count, info.device_count)
  return info


def _info(jax: Any, environment: str, coordinator: str | None) -> ProcessInfo:
  return ProcessInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                     local_devices=tuple(jax.local_devices()), device_count=jax.device_count(),
                     environment=environment, coordinator_address=coordinator)


def _start_watchdog(state: _State, settings: DistributedSpec) -> None:
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  info = state.info
  dog = Watchdog(jax_distributed.global_state.client, info.process_index, info.process_count,
                 settings.heartbeat_timeout_s, settings.watchdog_interval_s,
                 info.coordinator_address)
  dog.check()  # First beat before returning, so peers see this process from the start.
  dog.start()
  state.watchdog = dog
  state.previous_excepthook = sys.excepthook

  def excepthook(etype, value, tb):
    (state.previous_excepthook or sys.__excepthook__)(etype, value, tb)
    if lost_connection(value):
      # A collective broke because a peer vanished: the watchdog, still running, names the lost
      # peer and exits with EXIT_PEER_FAILED once its heartbeat is overdue. Give it that long.
      time.sleep(settings.heartbeat_timeout_s + 2 * settings.watchdog_interval_s)
    dog.stop(done=False)
    dog.publish_failure(f'{etype.__name__}: {value}')
    sys.stderr.write(f'jaxdiff.distributed: process {info.process_index} failed; told the other '
                     f'processes and exits with status 1.\n')
    flush()
    if info.process_index == 0:  # Hosts the key-value store: let the others read the news first.
      time.sleep(2 * settings.watchdog_interval_s + 0.5)
    os._exit(1)  # Not jax's shutdown barrier: it would wait for peers stuck in a collective.

  sys.excepthook = excepthook
  atexit.register(_mark_done_at_exit)  # Registered after jax's own: runs before its shutdown.


_LOST_CONNECTION = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe')


def lost_connection(error: BaseException) -> bool:
  """Whether `error` is a collective's transport failing under this process (a peer gone)."""
  return any(text in str(error) for text in _LOST_CONNECTION)


def _mark_done_at_exit() -> None:
  """A normal interpreter exit is a clean end: stop beating without alarming the others."""
  if _STATE is not None and _STATE.watchdog is not None:
    _STATE.watchdog.stop(done=True)
