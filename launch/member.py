"""A sweep member as launch/sweep.py leaves it and launch/sweep_report.py reads it: its folder's
name (its overrides, written and read back here), the runner's record of it, its metrics and what
its end tells. Both modules import this one, so neither needs the other's internals.
"""

import json
import math
import os
import re
import signal

from runtime import workdir as paths

# A value keeps its letters, digits and . + -; every other byte becomes %XX. So the '_' and '='
# that join a name's fields never occur inside a value (the name reads back unambiguously), and
# no '/' makes a member's folder a path.
_ESCAPED = re.compile(r'[^A-Za-z0-9.+-]+')
_FIELD = re.compile(r'([A-Za-z][\w.]*?)=(.*?)(?:_(?=[A-Za-z][\w.]*=)|$)')


def _keys(point: dict) -> list[str]:
  """Each field's last part, or the whole field where two fields share their last part."""
  last = [k.rsplit('.', 1)[-1] for k in point]
  return [part if last.count(part) == 1 else k for k, part in zip(point, last)]


def _quote(value) -> str:
  """VALUE with every byte outside [A-Za-z0-9.+-] as %XX."""
  return _ESCAPED.sub(lambda m: ''.join(f'%{b:02X}' for b in m[0].encode()), str(value))


def _unquote(text: str) -> str:
  """_quote undone."""
  return re.sub(r'(?:%[0-9A-F]{2})+',
                lambda m: bytes.fromhex(m[0].replace('%', '')).decode(errors='replace'), text)


def name(point: dict) -> str:
  """{'optim.learning_rate': '1e-3', 'model.remat': 'dots_saveable'} ->
  'learning_rate=1e-3_remat=dots%5Fsaveable'; 'base' for no overrides."""
  return '_'.join(f'{k}={_quote(v)}' for k, v in zip(_keys(point), point.values())) or 'base'


def parse_name(text: str) -> dict | None:
  """name()'s overrides back, keyed as in the name (a field's last part); None if it is no name.

  A name written before values were escaped reads as it always did, ambiguities included:
  'a=x_y_b=1' reads {'a': 'x', 'y_b': '1'}."""
  if text == 'base':
    return {}
  fields = _FIELD.findall(text)
  if not fields or '_'.join(f'{k}={v}' for k, v in fields) != text:
    return None
  return {k: _unquote(v) for k, v in fields}


def _unescaped_name(point: dict) -> str:
  """The name sweeps gave a member before values were escaped."""
  return '_'.join(f'{k.split(".")[-1]}={v}' for k, v in point.items()) or 'base'


def folder(root: str, point: dict) -> str:
  """ROOT/<name>: the member's workdir. A folder named the old way is kept, so that re-running a
  sweep started before values were escaped resumes its members instead of starting them anew."""
  new, old = os.path.join(root, name(point)), os.path.join(root, _unescaped_name(point))
  return old if not os.path.isdir(new) and os.path.isdir(old) else new


# ----------------------------------------------------------------------------- what it left


def read(workdir: str) -> dict:
  """The local runner's record of the member (sweep_member.json); {} when there is none yet."""
  try:
    with open(paths.member_file(workdir)) as f:
      state = json.load(f)
  except (OSError, ValueError):
    return {}  # Missing, or being written: the report falls back on the workdir.
  return state if isinstance(state, dict) else {}


def write(workdir: str, **fields) -> None:
  """Updates the runner's record with FIELDS; atomically, as the report may read it meanwhile."""
  os.makedirs(workdir, exist_ok=True)
  state = {**read(workdir), **fields}
  path = paths.member_file(workdir)
  with open(path + '.tmp', 'w') as f:
    json.dump(state, f, indent=1)
  os.replace(path + '.tmp', path)


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's rows; a half-written last line (a run writing it) is skipped."""
  rows = []
  try:
    with open(paths.metrics(workdir)) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict) and isinstance(row.get('step'), (int, float)):
          rows.append({k: v for k, v in row.items()  # A NaN loss is not a best loss.
                       if not (isinstance(v, float) and not math.isfinite(v))})
  except OSError:
    pass
  return rows


def progress(workdir: str) -> tuple[int | None, int | None]:
  """(the last step the member logged or checkpointed, its newest finished checkpoint)."""
  checkpoint = paths.last_finished_checkpoint(workdir)
  steps = [int(r['step']) for r in read_metrics(workdir)]
  return max(steps + ([checkpoint] if checkpoint is not None else []), default=None), checkpoint


def killed(returncode, step: int | None, checkpoint: int | None) -> str:
  """How a member ended by a signal (a negative return code) reads; '' for any other end.

  Its console's last line is then no error but a progress-bar fragment, so this says instead
  which signal, the last step it got to and what re-running the sweep does."""
  if not isinstance(returncode, int) or returncode >= 0:
    return ''
  try:
    what = signal.Signals(-returncode).name
  except ValueError:  # No signal of this platform.
    what = f'signal {-returncode}'
  when = f'after step {step}' if step is not None else 'before logging a step'
  then = (f'resumes it from step {checkpoint}' if checkpoint is not None
          else 'starts it again (no checkpoint yet)')
  return f'killed by {what} {when}; running the sweep again {then}'
