"""Failure watchdog for multi-process jobs, over jax's coordination-service key-value store.

Each process beats (writes a counter) every `interval_s`; a peer whose counter stalls for
`timeout_s`, or that publishes a failure, ends this process with EXIT_PEER_FAILED and a message
naming it. `cluster.distributed.initialize` starts one per process (see its docstring for why
jax's own heartbeat is not enough).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from cluster.contract import EXIT_PEER_FAILED

_KV_PREFIX = 'jaxdiff_watchdog/'


class Watchdog:
  """Heartbeats and failure reports over the coordination service's key-value store.

  Every `interval_s` a round writes this process's beat counter and reads all others: a peer whose
  counter has not moved for `timeout_s` is lost, a peer that published a failure has failed; both
  end this process with `exit_fn(EXIT_PEER_FAILED)` after printing which process it was.
  """

  def __init__(self, client: Any, process_id: int, num_processes: int, timeout_s: float,
               interval_s: float = 1.0, coordinator: str | None = None,
               exit_fn: Callable[[int], None] = os._exit,
               clock: Callable[[], float] = time.monotonic):
    self.client, self.me, self.n = client, process_id, num_processes
    self.timeout_s, self.interval_s, self.coordinator = timeout_s, interval_s, coordinator
    self.exit_fn, self.clock = exit_fn, clock
    self._seq = 0
    self._who = f'host {socket.gethostname()}, pid {os.getpid()}'
    start = clock()
    self._seen: dict[int, tuple[str, float]] = {p: ('', start) for p in range(num_processes)}
    self._rpc_ok_at = start
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def check(self) -> str | None:
    """One round: beat, then return why this process must stop (or None)."""
    now = self.clock()
    try:
      self._seq += 1
      self.client.key_value_set(f'{_KV_PREFIX}hb/{self.me}', f'{self._seq}|{self._who}',
                                allow_overwrite=True)
      entries = self.client.key_value_dir_get(_KV_PREFIX)
    except Exception as e:  # pylint: disable=broad-except
      if now - self._rpc_ok_at > self.timeout_s:
        return (f'lost contact with the coordination service on process 0 '
                f'({self.coordinator}) for {now - self._rpc_ok_at:.0f} s: {e}')
      return None
    self._rpc_ok_at = now
    beats, failed, done = {}, {}, set()
    for key, value in entries:
      kind, _, pid = key[len(_KV_PREFIX):].rpartition('/')
      if not pid.isdigit():
        continue
      if kind == 'hb':
        beats[int(pid)] = value
      elif kind == 'failed':
        failed[int(pid)] = value
      elif kind == 'done':
        done.add(int(pid))
    for pid, message in sorted(failed.items()):
      if pid != self.me:
        return f'process {pid} failed: {message}'
    for pid in range(self.n):
      if pid == self.me or pid in done:
        continue
      beat = beats.get(pid, '')
      last, since = self._seen[pid]
      if beat != last:
        self._seen[pid] = (beat, now)
      elif now - since > self.timeout_s:
        limit = f'(heartbeat_timeout_s={self.timeout_s:g}): presumed lost'
        if not beat:
          return f'process {pid} sent no heartbeat in {now - since:.1f} s {limit}'
        return (f'process {pid} ({beat.partition("|")[2]}) stopped heartbeating '
                f'{now - since:.0f} s ago {limit} (killed, crashed or cut off)')
    return None

  def _run(self) -> None:
    while not self._stop.wait(self.interval_s):
      reason = self.check()
      if reason and not self._stop.is_set():
        sys.stderr.write(f'\njaxdiff.distributed: {reason}. Process {self.me} exits with status '
                         f'{EXIT_PEER_FAILED} so the job fails instead of hanging; see process '
                         f'logs for the cause.\n')
        flush()
        self.exit_fn(EXIT_PEER_FAILED)
        return

  def start(self) -> None:
    self._thread = threading.Thread(target=self._run, name='jaxdiff-watchdog', daemon=True)
    self._thread.start()

  def publish_failure(self, message: str) -> None:
    """Tells the other processes that this one failed, and why."""
    try:
      self.client.key_value_set(f'{_KV_PREFIX}failed/{self.me}',
                                f'{message[:2000]} ({self._who})', allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # The coordinator is gone too; jax's own heartbeat ends the others.

  def stop(self, done: bool = True) -> None:
    """Stops the thread; `done` tells the others this process ended cleanly (no longer beats)."""
    self._stop.set()
    if done:
      try:
        self.client.key_value_set(f'{_KV_PREFIX}done/{self.me}', '1', allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except
        pass
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=self.interval_s + 5)


def flush() -> None:
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
