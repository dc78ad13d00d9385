"""Checkpoints: one orbax CheckpointManager with named items (state, config, data position).

Saves are asynchronous; `close()` waits for them. Restores go straight into the
sharded layout given by an abstract state of `jax.ShapeDtypeStruct`s with shardings,
so a checkpoint written on one mesh / process count restores onto another.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from configs import base

# Config fields whose change makes a checkpoint unusable (architecture and meaning of params).
# `model`: every field but these (which change how the same parameters are computed with).
_MODEL_FREE = ('dtype', 'param_dtype', 'remat', 'dropout')
_ARCH_FIELDS = {
    'model': None,  # All of config.model except _MODEL_FREE.
    'text': ('encoder', 'width', 'depth', 'num_heads', 'max_len', 'vocab', 'pretrained_path'),
    'data': ('image_size',),
    'diffusion': ('prediction',),
}


def state_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for this project's three items."""

  def __init__(self, workdir: str, cfg=None, *, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(cfg.keep) if cfg is not None else None,
        save_interval_steps=1,  # The loop decides when; the manager must not skip our calls.
        enable_async_checkpointing=bool(cfg.async_save) if cfg is not None else False,
        create=not read_only,
        read_only=read_only,
    )
    self.directory = state_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise FileNotFoundError(f'No checkpoints under {self.directory}: train first '
                              '(python train.py --workdir=...) or pass the right --workdir.')
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=('state', 'config', 'data'))

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster signalled pre-emption (all processes agree on the step)."""
    return bool(self._mngr.reached_preemption(step))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict, data_position: dict,
           *, force: bool = False) -> bool:
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
        data=ocp.args.JsonSave(data_position)), force=force)

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    """The config the run saved, over `configs/base.py` (a field added since then gets its default)."""
    step = self._resolve(step)
    restored = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = base.get_config()
    _merge(config, _tuples(restored.config))
    return config

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, data_position) into the shardings carried by `abstract_state`."""
    step = self._resolve(step)
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, dict(restored.data)

  def restore_params(self, abstract_params: Any, step: int | None = None, *,
                     use_ema: bool = True) -> tuple[Any, int]:
    """(parameters, step): only the EMA (or raw) parameters, read into `abstract_params`' shardings.

    An Orbax partial restore: the optimiser state and the other parameter copy are not read.
    """
    step = self._resolve(step)
    key = 'ema_params' if use_ema else 'params'
    item = {'step': jax.ShapeDtypeStruct((), jax.numpy.int32), key: abstract_params}
    path = os.path.join(self.directory, str(step), 'state')
    with ocp.PyTreeCheckpointer() as reader:  # Its own handler: the manager's reads whole states.
      restored = reader.restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    return restored[key], int(restored['step'])

  def _resolve(self, step):
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


def _tuples(obj):
  """JSON turns tuples into lists; ConfigDict fields declared as tuples want tuples back."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
  """Writes `saved` over `config`, section by section (fields the config lacks are added)."""
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      with config.ignore_type():
        config[key] = value


def check_compatible(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                     directory: str):
  """Raises if the checkpoint was written by a config with another architecture."""
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
    raise ValueError(f'The checkpoint in {directory} was written with another architecture:\n  '
                     + '\n  '.join(diffs)
                     + '\nUse a fresh --workdir, or set these fields back to the checkpoint values.')


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (what orbax restores into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
