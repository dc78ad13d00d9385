"""Local multi-process launcher: N copies of a command on this machine, one per JAX process.

  python -m launch.local --num_processes 2 --devices_per_process 4 -- \
      python train.py --config=configs/shapes.py:cpu --workdir=runs/local2

Each child gets JAXDIFF_COORDINATOR (127.0.0.1 and a free port), JAXDIFF_NUM_PROCESSES and
JAXDIFF_PROCESS_ID, which `cluster.distributed.initialize` reads. On CPU (the default) a child
sees `--devices_per_process` simulated devices (XLA_FLAGS); with `--gpus_per_process G` child r
gets GPUs [r*G, (r+1)*G) of the box through CUDA_VISIBLE_DEVICES instead. Output lines are
prefixed with `[rank r]`. When a child exits non-zero, the others are terminated and the launcher
exits non-zero naming that rank (a child that only reacted to a failed peer, status 3, gives the
real cause up to `--grace_s` to show up). `--dry_run` prints the exact commands and environments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Mapping, Sequence

from cluster.contract import (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID,
                              EXIT_PEER_FAILED)
from runtime import host

_DEVICE_COUNT_FLAG = host.DEVICE_COUNT_FLAG


@dataclasses.dataclass(frozen=True)
class Child:
  """One process to start: its rank, command line and the variables set for it."""
  rank: int
  argv: tuple[str, ...]
  env: dict[str, str]


def free_port(host: str = '127.0.0.1') -> int:
  """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _xla_flags(inherited: str, devices: int) -> str:
  kept = re.sub(rf'{_DEVICE_COUNT_FLAG}=\S*', '', inherited).split()
  return ' '.join(kept + [f'{_DEVICE_COUNT_FLAG}={devices}'])


def child_specs(command: Sequence[str], num_processes: int, *, devices_per_process: int = 1,
                gpus_per_process: int = 0, port: int | None = None, host: str = '127.0.0.1',
                base_env: Mapping[str, str] = os.environ) -> list[Child]:
  """The children to start for `command`; raises ValueError on bad counts."""
  if not command:
    raise ValueError('No command to launch: put it after `--`, e.g. '
                     '`python -m launch.local --num_processes 2 -- python train.py ...`.')
  if num_processes < 1:
    raise ValueError(f'--num_processes must be >= 1, got {num_processes}.')
  if devices_per_process < 1:
    raise ValueError(f'--devices_per_process must be >= 1, got {devices_per_process}.')
  if gpus_per_process < 0:
    raise ValueError(f'--gpus_per_process must be >= 0, got {gpus_per_process}.')
  gpus: list[str] = []
  if gpus_per_process:
    visible = base_env.get('CUDA_VISIBLE_DEVICES')
    gpus = ([g for g in visible.split(',') if g] if visible
            else [str(i) for i in range(num_processes * gpus_per_process)])
    if len(gpus) < num_processes * gpus_per_process:
      raise ValueError(f'--num_processes {num_processes} x --gpus_per_process {gpus_per_process} '
                       f'needs {num_processes * gpus_per_process} GPUs, but CUDA_VISIBLE_DEVICES='
                       f'{visible!r} lists {len(gpus)}.')
  port = port or free_port(host)
  children = []
  for rank in range(num_processes):
    env = {ENV_COORDINATOR: f'{host}:{port}',
           ENV_NUM_PROCESSES: str(num_processes),
           ENV_PROCESS_ID: str(rank),
           'PYTHONUNBUFFERED': '1'}
    if gpus_per_process:
      env['CUDA_VISIBLE_DEVICES'] = ','.join(
          gpus[rank * gpus_per_process:(rank + 1) * gpus_per_process])
    else:
      env['JAX_PLATFORMS'] = 'cpu'
      env['XLA_FLAGS'] = _xla_flags(base_env.get('XLA_FLAGS', ''), devices_per_process)
    children.append(Child(rank, tuple(command), env))
  return children


def format_dry_run(children: Sequence[Child]) -> str:
  """One shell line per child: `VAR=value ... command`."""
  lines = []
  for c in children:
    assignments = ' '.join(f'{k}={shlex.quote(v)}' for k, v in sorted(c.env.items()))
    lines.append(f'# rank {c.rank}\n{assignments} {shlex.join(c.argv)}')
  return '\n'.join(lines)


def _describe(status: int) -> str:
  if status < 0:
    try:
      return f'killed by {signal.Signals(-status).name}'
    except ValueError:
      return f'killed by signal {-status}'
  return f'exited with status {status}'


def _first_failure(statuses: Sequence[int | None]) -> tuple[int, int] | None:
  """(rank, status) of a failed child, preferring a root cause to EXIT_PEER_FAILED."""
  failures = [(r, s) for r, s in enumerate(statuses) if s not in (None, 0)]
  causes = [f for f in failures if f[1] != EXIT_PEER_FAILED]
  return (causes or failures or [None])[0]


def _pump(stream: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b''):
    line = raw.decode('utf-8', errors='replace')
    with lock:
      out.write(prefix + line if line.endswith('\n') else prefix + line + '\n')
      out.flush()
  stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)  # The child leads its own session: this reaches its children too.
  except ProcessLookupError:
    pass


def run(children: Sequence[Child], *, base_env: Mapping[str, str] = os.environ,
        out: IO[str] = sys.stdout, err: IO[str] = sys.stderr, grace_s: float = 10.0) -> int:
  """Starts the children and waits; returns 0, or the status of the first child that failed."""
  lock = threading.Lock()
  width = len(str(len(children) - 1))
  procs, pumps = [], []
  for c in children:
    proc = subprocess.Popen(list(c.argv), env={**base_env, **c.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    prefix = f'[rank {c.rank:>{width}}] '
    pump = threading.Thread(target=_pump, args=(proc.stdout, prefix, out, lock), daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  failed: tuple[int, int] | None = None
  try:
    while True:
      statuses = [p.poll() for p in procs]
      failed = _first_failure(statuses)
      if failed is not None or all(s == 0 for s in statuses):
        break
      time.sleep(0.1)
    if failed is not None and failed[1] == EXIT_PEER_FAILED:
      # That child only reacted to another one's failure: wait a little for the real cause.
      deadline = time.monotonic() + grace_s
      while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
        if _first_failure([p.poll() for p in procs])[1] != EXIT_PEER_FAILED:
          break
      failed = _first_failure([p.poll() for p in procs])
  except KeyboardInterrupt:
    failed = (-1, -signal.SIGINT)
  if failed is not None:
    rank, status = failed
    running = [r for r, p in enumerate(procs) if p.poll() is None]
    with lock:
      who = 'interrupted' if rank < 0 else f'rank {rank} {_describe(status)}'
      err.write(f'launch.local: {who}; terminating ranks {running}.\n' if running
                else f'launch.local: {who}.\n')
      err.flush()
    for r in running:
      _signal_group(procs[r], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for r in running:
      try:
        procs[r].wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        _signal_group(procs[r], signal.SIGKILL)
        procs[r].wait()
  for pump in pumps:
    pump.join(timeout=5)
  if failed is None:
    return 0
  rank, status = failed
  if rank >= 0:
    err.write(f'launch.local: FAILED: rank {rank} {_describe(status)}.\n')
  return status if status > 0 else 128 + (-status)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  argv = list(argv)
  split = argv.index('--') if '--' in argv else len(argv)
  parser = argparse.ArgumentParser(prog='python -m launch.local', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', type=int, required=True, help='Processes to start.')
  parser.add_argument('--devices_per_process', type=int, default=1,
                      help='CPU: simulated devices per process (XLA_FLAGS).')
  parser.add_argument('--gpus_per_process', type=int, default=0,
                      help='GPU box: split CUDA_VISIBLE_DEVICES, this many per process (0 = CPU).')
  parser.add_argument('--port', type=int, default=0, help='Coordinator port; 0 = a free one.')
  parser.add_argument('--host', default='127.0.0.1', help='Coordinator address.')
  parser.add_argument('--grace_s', type=float, default=10.0,
                      help='Seconds between SIGTERM and SIGKILL for the survivors of a failure.')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands, start nothing.')
  return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
  args, command = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    children = child_specs(command, args.num_processes,
                           devices_per_process=args.devices_per_process,
                           gpus_per_process=args.gpus_per_process, port=args.port or None,
                           host=args.host)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.dry_run:
    print(format_dry_run(children))
    return 0
  signal.signal(signal.SIGTERM, _interrupt)  # A scheduler stopping us stops the children too.
  return run(children, grace_s=args.grace_s)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


if __name__ == '__main__':
  sys.exit(main())
