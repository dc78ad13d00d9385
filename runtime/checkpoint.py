"""Checkpoints: one orbax CheckpointManager with named items (state, config, data position).

Saves are asynchronous; `close()` waits for them. Restores go straight into the
sharded layout given by an abstract state of `jax.ShapeDtypeStruct`s with shardings,
so a checkpoint written on one mesh / process count restores onto another.

What the cluster does to a workdir is survived here: a folder under `checkpoints/` that is not a
checkpoint (no orbax metadata, e.g. `checkpoints/100/README`) is set aside, and a checkpoint that
fails to restore (truncated files, garbage metadata) is reported with its step and path, set aside
into `checkpoints.corrupt/` (never deleted), and the next older one is used. Read-only users
(sample.py) skip both without moving anything.
"""

import collections
import json
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from models import weights
from runtime import console
from runtime import workdir as paths

# Config fields whose change makes a checkpoint unusable (architecture and meaning of params).
# `model`: every field but these (which change how the same parameters are computed with).
# (model.pretrained: a folder may move; the frozen parts are compared by weight digest instead.)
_MODEL_FREE = ('dtype', 'param_dtype', 'remat', 'dropout', 'attention', 'pretrained',
               'pretrained_changes')
_ARCH_FIELDS = {
    'model': None,  # All of config.model except _MODEL_FREE.
    'text': ('encoder', 'width', 'depth', 'num_heads', 'max_len', 'vocab', 'finetune'),
    'data': ('image_size',),
    'diffusion': ('prediction',),
}


_ITEMS = ('state', 'config', 'data')
# Key of the saved config item holding the frozen components' {name: [weight digest, folder]}.
FROZEN_KEY = '_frozen'
# Their names (in errors too).
FROZEN_AUTOENCODER, FROZEN_TEXT, FROZEN_BASE = ('autoencoder', 'text encoder',
                                                'U-Net under the LoRA adapters')


class CheckpointError(ValueError):
  """No checkpoint of a workdir can be restored (each one's step and reason are in the message)."""


class IncompatibleCheckpoint(ValueError):
  """The checkpoint is intact but was written by another architecture: the config is at fault,
  so no older checkpoint is tried."""


def _write_whole_replicas_in_one_process() -> None:
  """In a single process, every replica of an array is local: orbax's replica-parallel writing
  only adds a compiled slice per array shape (120 programs, about 7 s at the first save of the
  tiny config on 2 x 2 devices). Write replica 0 whole instead; several processes keep it."""
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def state_dir(workdir: str) -> str:
  """WORKDIR/checkpoints as an absolute path (orbax needs one)."""
  return paths.checkpoints(os.path.abspath(workdir))


def _is_checkpoint(folder: str) -> bool:
  """Whether a numeric folder under checkpoints/ was written by orbax (not a stray folder)."""
  return paths.is_checkpoint(folder, items=_ITEMS)


def describe_error(e: BaseException) -> str:
  """The first line of an exception, shortened: what a warning or an error line shows."""
  text = (str(e).strip().splitlines() or [''])[0] or type(e).__name__
  text = text.split(' See full TensorStore details')[0]  # (Then a repr of the whole spec.)
  return f'{type(e).__name__}: {text[:200]}'


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for this project's three items."""

  def __init__(self, workdir: str, spec=None, *, read_only: bool = False):
    """`spec`: the run's `CheckpointSpec` (keep, async_save); None: keep all, save synchronously."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(spec.keep) if spec is not None else None,
        save_interval_steps=1,  # The loop decides when; the manager must not skip our calls.
        enable_async_checkpointing=bool(spec.async_save) if spec is not None else False,
        create=not read_only,
        read_only=read_only,
    )
    self.directory = state_dir(workdir)
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f'No checkpoints under {self.directory}: train first '
                              '(python train.py --workdir=...) or pass the right --workdir.')
    self._ignored = self._set_aside_strays()
    self._options = options
    _write_whole_replicas_in_one_process()
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def _set_aside_strays(self) -> set[int]:
    """Numeric folders under checkpoints/ that orbax did not write: moved to checkpoints.ignored/
    (read-only: only skipped), each with a warning. Returns the steps skipped in place."""
    if not os.path.isdir(self.directory):
      return set()
    strays = sorted(int(n) for n in os.listdir(self.directory)
                    if n.isdigit() and not _is_checkpoint(os.path.join(self.directory, n)))
    if self.read_only:
      for step in strays:
        logging.warning('Ignoring %s: not a checkpoint (no orbax metadata).',
                        os.path.join(self.directory, str(step)))
      return set(strays)
    for step in strays:
      target = self._set_aside(step, paths.IGNORED)
      logging.warning('%s is not a checkpoint (no orbax metadata): moved to %s, and ignored.',
                      os.path.join(self.directory, str(step)), target)
    if strays and jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoint_strays_set_aside')
    return set()

  def _set_aside(self, step: int, kind: str) -> str:
    """Moves checkpoints/STEP to checkpoints.KIND/STEP[-time] (process 0; nothing is deleted)."""
    target = os.path.join(paths.set_aside(os.path.dirname(self.directory), kind), str(step))
    if os.path.exists(target):
      target += f'-{int(time.time())}'
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    return target

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster signalled pre-emption (all processes agree on the step)."""
    return bool(self._mngr.reached_preemption(step))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(s for s in self._mngr.all_steps() if s not in self._ignored)

  def restore_latest_intact(self, restore: Callable[[int], Any]) -> tuple[Any, int] | None:
    """`restore(step)` of the newest checkpoint it succeeds on, and that step; None if there are
    no checkpoints.

    A checkpoint whose restore raises is reported (step, path, reason) and the next older one is
    tried. Once one succeeds, the newer failed ones are moved to checkpoints.corrupt/ (writable
    Checkpointer) so that the run's next saves do not meet them. If every one fails, nothing is
    moved and CheckpointError lists each step's reason (a changed config fails them all alike).
    With several processes, a step counts as restored only if it restored on every process.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    console.quiet_closed_loop_errors()  # A failed restore's pending reads: no traceback each.
    failures = []
    for step in steps:
      try:
        result, error = restore(step), None
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore/json raise anything)
        result, error = None, e
      ok = error is None
      if jax.process_count() > 1:
        ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
        error = error or RuntimeError('it failed to restore on another process')
      if ok:
        break
      path = os.path.join(self.directory, str(step))
      logging.warning('Checkpoint step %d at %s could not be restored (%s); trying the one '
                      'before it.', step, path, describe_error(error))
      failures.append((step, error))
    else:
      raise CheckpointError(
          f'No checkpoint in {self.directory} can be restored: '
          + '; '.join(f'step {s}: {describe_error(e)}' for s, e in failures)
          + '. If the config changed since they were written, set it back (or use a fresh '
          '--workdir); if the files are damaged, move the checkpoints folder aside to start '
          'afresh.')
    if failures and not self.read_only:
      for bad, _ in failures:
        target = self._set_aside(bad, paths.CORRUPT)
        logging.warning('Moved the damaged checkpoint step %d to %s (kept, not deleted); resuming '
                        'from step %d.', bad, target, step)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('checkpoint_corrupt_set_aside')
      self._mngr.reload()
    return result, step

  def save(self, step: int, state: Any, config_record: dict, data_position: dict,
           *, force: bool = False) -> bool:
    """Saves the state, the run's config (as a plain dict, `Settings.config_record()`) and the
    data position."""
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_record),
        data=ocp.args.JsonSave(data_position)), force=force)

  def saved_config(self, step: int | None = None) -> dict:
    """The config the run saved with checkpoint `step`, as it was written (lists as tuples);
    `configs.specs.from_saved` makes settings of it."""
    step = self.resolve(step)
    restored = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return _tuples(restored.config)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data_position) into the shardings carried by `abstract_state`."""
    step = self.resolve(step)
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def restore_params(self, abstract_params: Any, step: int | None = None, *,
                     use_ema: bool = True) -> tuple[Any, int]:
    """(parameters, step): only the EMA (or raw) parameters, read into `abstract_params`' shardings.

    An Orbax partial restore: the optimiser state and the other parameter copy are not read.
    """
    step = self.resolve(step)
    key = 'ema_params' if use_ema else 'params'
    item = {'step': jax.ShapeDtypeStruct((), jax.numpy.int32), key: abstract_params}
    path = os.path.join(self.directory, str(step), 'state')
    with ocp.PyTreeCheckpointer() as reader:  # Its own handler: the manager's reads whole states.
      restored = reader.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    return restored[key], int(restored['step'])

  def resolve(self, step):
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f'No checkpoint found in {self.directory}.')
      return max(steps)
    if step not in steps:
      raise FileNotFoundError(f'Checkpoint step {step} not in {self.directory}; available: {steps}.')
    return step

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


class DivergenceGuard:
  """Decides whether a step's state may be saved (config.checkpoint.divergence_*).

  `observe` takes every step's loss, gradient norm and norm of the updated parameters, in order.
  `verdict()` on the last observed step: None if it may be saved, else the reason. A state whose
  parameters are not finite is never saved; with `factor` > 0 neither is one whose loss, gradient
  norm or parameter norm exceeds factor x the median of the previous `window` steps (once
  min(10, window) steps are known). A state one step before a NaN can be finite but diverged (huge parameters,
  normal loss and gradient of the step that made it); its parameter norm gives it away.
  """
  MIN_HISTORY = 10
  NAMES = ('loss', 'gradient norm', 'parameter norm')

  def __init__(self, factor: float, window: int):
    self.factor, self.window = float(factor), int(window)
    self._history = collections.deque(maxlen=max(self.window, 1))
    self._last = None
    self.max_ratios = [0.0, 0.0, 0.0]  # Largest value / trailing median seen (for tuning).

  def observe(self, loss: float, grad_norm: float, param_norm: float) -> None:
    values = (float(loss), float(grad_norm), float(param_norm))
    if len(self._history) >= min(self.MIN_HISTORY, self.window):
      medians = np.median(np.array(self._history), axis=0)
      ratios = [v / m if m > 0 else math.inf for v, m in zip(values, medians)]
      self.max_ratios = [max(a, r) for a, r in zip(self.max_ratios, ratios)]
    else:
      medians = None
    self._last = (values, medians)
    self._history.append(values)

  def verdict(self) -> str | None:
    if self._last is None:
      return None
    values, medians = self._last
    if not math.isfinite(values[2]):
      return f'its parameters are not finite (norm {values[2]})'
    if self.factor <= 0 or medians is None:
      return None
    for name, v, m in zip(self.NAMES, values, medians):
      if not v <= self.factor * m:
        return (f'its {name} {v:.4g} is over checkpoint.divergence_factor={self.factor:g} x the '
                f'median {m:.4g} of the last {len(self._history) - 1} steps')
    return None


def _tuples(obj):
  """JSON turns tuples into lists; ConfigDict fields declared as tuples want tuples back."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def check_compatible(saved: dict, current: dict, directory: str):
  """Raises IncompatibleCheckpoint if the checkpoint's config (`saved_config`) has another
  architecture than the current one (both plain dicts of the config)."""
  diffs = []
  for section, fields in _ARCH_FIELDS.items():
    if fields is None:
      names = set(saved.get(section, {}).keys()) | set(current[section].keys())
      fields = sorted(names - set(_MODEL_FREE))
    for f in fields:
      a = saved.get(section, {}).get(f) if section in saved else None
      b = current[section].get(f) if section in current else None
      if a is not None and b is not None and json.dumps(a) != json.dumps(_tuples(b)):
        diffs.append(f'{section}.{f}: checkpoint {a!r} vs config {b!r}')
  if diffs:
    raise IncompatibleCheckpoint(
        f'The checkpoint in {directory} was written with another architecture: '
        + '; '.join(diffs) + '. Use a fresh --workdir, or set these fields back to the '
        'checkpoint values.')
  was, now = saved.get(FROZEN_KEY) or {}, current.get(FROZEN_KEY) or {}
  for name in sorted(set(was) & set(now)):  # Runs saved before digests were kept: nothing to check.
    _refuse_other_frozen(name, was[name], now[name], directory)


def check_frozen(saved: dict, name: str, params: Any, folder: str, directory: str) -> None:
  """Raises IncompatibleCheckpoint if frozen component `name`'s weights `params` (from `folder`)
  are not those the checkpoint's saved config `saved` recorded (nothing recorded: passes)."""
  recorded = (saved.get(FROZEN_KEY) or {}).get(name)
  if recorded is not None:
    _refuse_other_frozen(name, recorded, [weights.digest(params), folder], directory)


def _refuse_other_frozen(name, was, now, directory):
  if was[0] != now[0]:
    raise IncompatibleCheckpoint(
        f'The {name} differs from the one the checkpoint in {directory} was trained with: '
        f'weight digest {now[0]} ({now[1]}) vs {was[0]} ({was[1]}). '
        'A frozen component must not change under a run: point the config back at the '
        'original weights, or start a fresh --workdir.')


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (what orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
