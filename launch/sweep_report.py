"""One table of a sweep's members (status, losses, eval scores, speed), its best member and plots.

  python -m launch.sweep report runs/lr_sweep            # or: python -m launch.sweep_report DIR
  python -m launch.sweep report runs/lr_sweep --metric=eval/all.colour --out=/tmp/report

Reads SWEEP_DIR/sweep.json (the members, their overrides and the sweep's config) and each member's
workdir: metrics.jsonl, checkpoints/<step>/, error.log and the runner's sweep_member.json. Without
sweep.json (e.g. a SLURM array), the members are the subfolders holding metrics.jsonl or
checkpoints/. Safe while the sweep runs: it only reads, and skips half-written lines.
Prints the table and writes report.md, report.csv, report_loss.png (train loss vs step) and
report_<field>.png per swept field (the field's value against the metric) into SWEEP_DIR or --out.
The charts are drawn by launch/sweep_plots.py.
"""

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time

from configs import loading
from launch import member, sweep_plots
from runtime import workdir as paths

RUNNING_WINDOW_S = 600  # A member whose metrics.jsonl changed this recently is running.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAMED = {'final_loss': 'final train loss', 'best_loss': 'best train loss',
          'steps_per_sec': 'steps/s'}
_ALIASES = {'loss': 'final_loss', 'train/loss': 'final_loss',
            'train/steps_per_sec': 'steps_per_sec'}


@dataclasses.dataclass
class Member:
  """One point of the sweep, as far as its workdir tells."""
  name: str
  workdir: str
  overrides: dict  # Swept field -> value (strings, as on the command line).
  status: str = 'pending'  # done | failed | running | stopped | pending
  step: int | None = None  # Last step logged or checkpointed.
  num_steps: int | None = None  # optim.num_steps of its config (None: unknown).
  final_loss: float | None = None  # Last logged train/loss.
  best_loss: float | None = None  # Lowest logged train/loss.
  evals: dict = dataclasses.field(default_factory=dict)  # eval/all.* fractions, last evaluation.
  last_eval: dict = dataclasses.field(default_factory=dict)  # Every eval/* scalar of it.
  steps_per_sec: float | None = None  # Median of train/steps_per_sec.
  failure: str = ''  # The error line of a failed member.
  losses: list = dataclasses.field(default_factory=list)  # (step, train/loss), the latest of each.

  def value(self, metric: str) -> float | None:
    if metric in _NAMED:
      return getattr(self, metric)
    return self.last_eval.get(metric)


@dataclasses.dataclass
class Sweep:
  folder: str
  config: str | None  # The sweep's config spec (None without sweep.json).
  extra: list  # Flags every member got.
  fields: list  # Swept fields, in sweep order.
  members: list


# ------------------------------------------------------------------ reading a sweep folder


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # Missing, or being written: the caller falls back.


def failure_line(path: str) -> str:
  """The last line of a traceback file that starts with a non-space: the exception's message."""
  try:
    with open(path, errors='replace') as f:
      lines = [l.rstrip() for l in f if l.strip() and not l[0].isspace()]
  except OSError:
    return ''
  return lines[-1] if lines else ''


def _entries(folder: str):
  """(config, extra, [(name, workdir, overrides or None)]) from sweep.json or the subfolders."""
  meta = _read_json(paths.sweep_file(folder))
  if isinstance(meta, dict) and isinstance(meta.get('members'), list):
    entries = []
    for m in meta['members']:
      recorded = m.get('workdir') or m['name']
      name = m.get('name') or os.path.basename(recorded.rstrip('/'))
      candidates = [recorded, os.path.join(folder, os.path.basename(recorded.rstrip('/'))),
                    os.path.join(folder, name)]  # The sweep folder may have moved since.
      workdir = next((c for c in candidates if os.path.isdir(c)), candidates[-1])
      entries.append((name, workdir, {k: str(v) for k, v in (m.get('overrides') or {}).items()}))
    return meta.get('config'), list(meta.get('extra') or []), entries
  if isinstance(meta, list):  # launch.sweep's first format: [{'point': {...}, 'returncode': rc}].
    points = [r['point'] for r in meta if isinstance(r, dict) and 'point' in r]
    workdirs = [member.folder(folder, p) for p in points]
    return None, [], [(os.path.relpath(w, folder), w, p) for p, w in zip(points, workdirs)]
  is_run = lambda d: os.path.isfile(paths.metrics(d)) or os.path.isdir(paths.checkpoints(d))
  names = sorted(n for n in os.listdir(folder) if is_run(os.path.join(folder, n)))
  return None, [], [(n, os.path.join(folder, n), None) for n in names]


class _NumSteps:
  """optim.num_steps of a member: its config as train.py loads it, else its last checkpoint's."""

  def __init__(self, config: str | None, extra: list):
    self.spec, self.extra = config, loading.split_argv(extra)[1]
    if config:
      path, colon, arg = config.partition(':')
      if not os.path.isfile(path) and os.path.isfile(os.path.join(_REPO, path)):
        self.spec = os.path.join(_REPO, path) + colon + arg  # Run from outside the repository.
    self.warned = False

  def __call__(self, overrides: dict, workdir: str, checkpoint: int | None) -> int | None:
    if self.spec:
      try:
        flags = [f'{loading.PREFIX}{k}={v}' for k, v in overrides.items()] + self.extra
        return int(loading.load(self.spec, flags).optim.num_steps)
      except (ValueError, FileNotFoundError) as e:
        if not self.warned:
          print(f'warning: cannot load the sweep config ({" ".join(str(e).split())}); '
                'num_steps is taken from the checkpoints.', file=sys.stderr)
          self.warned = True
    if checkpoint is not None:  # orbax's JSON item: the config the run saved.
      saved = _read_json(paths.saved_config(workdir, checkpoint))
      if isinstance(saved, dict) and isinstance(saved.get('optim'), dict):
        return saved['optim'].get('num_steps')
    return None


def _status(m: Member, checkpoint, runner: dict, now: float) -> str:
  """The member's status (see Member.status); a failed one's `failure` is set to why."""
  workdir = m.workdir
  if not os.path.isdir(workdir) or not os.listdir(workdir):
    return 'pending'
  said = runner.get('status')
  if m.num_steps is not None and checkpoint is not None and checkpoint >= m.num_steps:
    return 'done'
  if m.num_steps is None and said == 'done':
    return 'done'
  error_log = paths.error_log(workdir)
  metrics_mtime = _mtime(paths.metrics(workdir))
  # An error.log older than the last metrics (or the runner's restart) is from an earlier attempt.
  fresh_error = os.path.isfile(error_log) and _mtime(error_log) >= max(
      metrics_mtime or 0, runner.get('started') or 0)
  if said == 'failed' or fresh_error:
    # A fresh error.log names the error. A signal is said in words before the runner's line: the
    # runner used to record the console's last line, for a killed member a progress-bar fragment.
    code = runner.get('returncode')
    m.failure = ((failure_line(error_log) if fresh_error else '')
                 or member.killed(code, m.step, checkpoint)
                 or runner.get('failure') or runner.get('error')
                 or (f'exit status {code}' if code else 'failed'))
    return 'failed'
  if said == 'running' or (metrics_mtime is not None and now - metrics_mtime < RUNNING_WINDOW_S):
    return 'running'
  return 'stopped'


def _mtime(path):
  try:
    return os.path.getmtime(path)
  except OSError:
    return None


def _is_fraction(key: str, value) -> bool:
  last = key.rsplit('.', 1)[-1]
  return (isinstance(value, (int, float)) and 0 <= value <= 1 and last != 'n'
          and not last.startswith('n_'))


def read_member(name: str, workdir: str, overrides: dict, num_steps: _NumSteps,
                now: float | None = None) -> Member:
  """One member's row, from its workdir."""
  m = Member(name, workdir, dict(overrides))
  rows = member.read_metrics(workdir)
  logged = [(int(r['step']), r['train/loss']) for r in rows if 'train/loss' in r]
  if logged:
    m.final_loss, m.best_loss = logged[-1][1], min(l for _, l in logged)
  m.losses = sorted(dict(logged).items())  # A resumed run logs its replayed steps again.
  speeds = [r['train/steps_per_sec'] for r in rows if 'train/steps_per_sec' in r]
  m.steps_per_sec = statistics.median(speeds) if speeds else None
  evals = [r for r in rows if any(k.startswith('eval/') for k in r)]
  if evals:
    last = max(int(r['step']) for r in evals)
    for r in evals:
      if int(r['step']) == last:
        m.last_eval.update({k: v for k, v in r.items() if k.startswith('eval/')})
    m.evals = {k: v for k, v in m.last_eval.items()
               if k.startswith('eval/all.') and _is_fraction(k, v)}
  checkpoint = paths.last_finished_checkpoint(workdir)
  m.step = max([int(r['step']) for r in rows] + ([checkpoint] if checkpoint is not None else []),
               default=None)
  m.num_steps = num_steps(overrides, workdir, checkpoint)
  m.status = _status(m, checkpoint, member.read(workdir), time.time() if now is None else now)
  return m


def collect(folder: str, now: float | None = None) -> Sweep:
  """Every member of the sweep in `folder` and what its workdir tells (see the module doc)."""
  config, extra, entries = _entries(folder)
  runners = [member.read(w) for _, w, _ in entries]
  overrides = [o if o is not None else r.get('overrides') for (_, _, o), r in zip(entries, runners)]
  if any(o is None for o in overrides):  # Read the names back, if every one parses alike.
    parsed = [member.parse_name(n) for n, _, _ in entries]
    same = all(p is not None and p.keys() == parsed[0].keys() for p in parsed)
    known = {k.rsplit('.', 1)[-1]: k for o in overrides if o for k in o}  # Short -> full names.
    overrides = [o if o is not None else {known.get(k, k): v for k, v in p.items()} if same else {}
                 for o, p in zip(overrides, parsed)]
  fields = list(dict.fromkeys(k for o in overrides for k in o))
  steps = _NumSteps(config, extra)
  members = [read_member(n, w, o, steps, now) for (n, w, _), o in zip(entries, overrides)]
  return Sweep(folder, config, extra, fields, members)


# ------------------------------------------------------------------ the best member and the table


LOWER_IS_BETTER = ('fid', 'kid', 'kid_std', 'cmmd')  # Besides losses (evaluation/quality.py).


def lower_is_better(metric: str) -> bool:
  return 'loss' in metric or metric.rsplit('/', 1)[-1] in LOWER_IS_BETTER


def label(metric: str) -> str:
  return _NAMED.get(metric, metric)


def fmt(metric: str, value) -> str:
  if value is None:
    return '-'
  if metric.startswith('eval/all.') and 0 <= value <= 1:  # The Shapes scores' fractions.
    return f'{100 * value:.1f}%'
  if metric == 'steps_per_sec':
    return f'{value:.2f}'
  return f'{value:.4f}' if 1e-3 <= abs(value) < 1e4 else f'{value:.3g}'


DEFAULT_METRICS = ('eval/all.full', 'eval/val_loss')  # The Shapes score, the validation loss.


def default_metric(members: list) -> str:
  """The first of DEFAULT_METRICS that every done member has and that tells them apart (with none
  done: every member with a loss), else the final train loss."""
  pool = ([m for m in members if m.status == 'done']
          or [m for m in members if m.final_loss is not None])
  for metric in DEFAULT_METRICS:
    scores = [m.value(metric) for m in pool]
    if pool and None not in scores and len(set(scores)) > 1:
      return metric
  return 'final_loss'


def best(members: list, metric: str) -> tuple:
  """(best member or None, the criterion in words): among done members, else all so far."""
  done = [m for m in members if m.status == 'done']
  scored = [m for m in (done or members) if m.value(metric) is not None]
  if not scored:
    return None, f'by {label(metric)}: no member has it yet'
  lower = lower_is_better(metric)
  pick = (min if lower else max)(scored, key=lambda m: m.value(metric))
  n = len(scored)
  among = f'{n} done member{"s" * (n > 1)}' if done else f'{n} member{"s" * (n > 1)} (none done)'
  return pick, f'by {label(metric)}, {"lowest" if lower else "highest"} of {among}'


def _short(fields: list) -> dict:
  """Column names: the field's last part unless two fields share it."""
  last = [f.rsplit('.', 1)[-1] for f in fields]
  return {f: (l if last.count(l) == 1 else f) for f, l in zip(fields, last)}


def rows(sweep: Sweep) -> tuple[list, list]:
  """(header, rows of strings) of the table, one row per member."""
  evals = list(dict.fromkeys(['eval/all.full'] + [k for m in sweep.members for k in m.evals]))
  evals = [k for k in evals if any(k in m.evals for m in sweep.members)]
  short = _short(sweep.fields)
  head = ([short[f] for f in sweep.fields] or ['member']) + [
      'status', 'step', 'final loss', 'best loss'] + [k[len('eval/all.'):] for k in evals] + [
      'steps/s', 'note']
  body = []
  for m in sweep.members:
    step = f'{"-" if m.step is None else m.step}/{"?" if m.num_steps is None else m.num_steps}'
    body.append([m.overrides.get(f, '-') for f in sweep.fields] or [m.name])
    body[-1] += [m.status, step, fmt('final_loss', m.final_loss), fmt('best_loss', m.best_loss)]
    body[-1] += [fmt(k, m.evals.get(k)) for k in evals]
    body[-1] += [fmt('steps_per_sec', m.steps_per_sec), m.failure]
  return head, body


def table(head: list, body: list) -> str:
  """Aligned columns for the console (the last column, the note, is not padded)."""
  widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in [head] + body)


def write_csv(path: str, sweep: Sweep) -> None:
  evals = list(dict.fromkeys(k for m in sweep.members for k in m.evals))
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['name'] + sweep.fields + ['status', 'step', 'num_steps', 'final_loss', 'best_loss']
               + evals + ['steps_per_sec', 'failure', 'workdir'])
    for m in sweep.members:
      w.writerow([m.name] + [m.overrides.get(k, '') for k in sweep.fields] + [
          m.status, m.step, m.num_steps, m.final_loss, m.best_loss] + [
          m.evals.get(k) for k in evals] + [m.steps_per_sec, m.failure, m.workdir])


def write_markdown(path: str, sweep: Sweep, head, body, best_line: str, plots: list) -> None:
  counts = ', '.join(f'{sum(m.status == s for m in sweep.members)} {s}'
                     for s in ('done', 'running', 'failed', 'stopped', 'pending')
                     if any(m.status == s for m in sweep.members))
  lines = [f'# Sweep report: {sweep.folder}', '',
           f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {len(sweep.members)} members, {counts}.']
  if sweep.config:
    lines.append(f'Config `{sweep.config}`' + (f', for every member `{" ".join(sweep.extra)}`'
                                               if sweep.extra else '') + '.')
  lines += ['', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  lines += ['| ' + ' | '.join(c.replace('|', '\\|') or ' ' for c in r) + ' |' for r in body]
  lines += ['', best_line, '']
  lines += [f'![{os.path.splitext(p)[0]}]({p})' for p in plots]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


# ------------------------------------------------------------------ entry point


def main(argv=None, prog: str = 'python -m launch.sweep report') -> int:
  """Prints the table and the best member, and writes the report files (see the module doc)."""
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument('sweep_dir', help="the sweep's --root: sweep.json and the members' workdirs")
  parser.add_argument('--metric', default='', help='ranks the members and is plotted against each '
                      'field: final_loss, best_loss, steps_per_sec or eval/<name> (default: '
                      f'the first of {", ".join(DEFAULT_METRICS)} that every done member has, '
                      'else final_loss)')
  parser.add_argument('--out', default='', help='folder of the report files (default: SWEEP_DIR)')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.sweep_dir):
    parser.error(f'{args.sweep_dir!r} is not a folder; give a sweep\'s --root.')
  sweep = collect(args.sweep_dir)
  if not sweep.members:
    parser.error(f'{args.sweep_dir!r} holds no sweep: no {paths.SWEEP_FILE} and no subfolder '
                 f'with {paths.METRICS} or {paths.CHECKPOINTS}/.')
  metric = _ALIASES.get(args.metric, args.metric) or default_metric(sweep.members)
  known = ', '.join(sorted(set(_NAMED) | {k for m in sweep.members for k in m.last_eval}))
  if metric not in _NAMED and not metric.startswith('eval/'):
    parser.error(f'--metric={args.metric}: use final_loss, best_loss, steps_per_sec or an eval/ '
                 f'metric ({known}).')
  if metric not in _NAMED and not any(metric in m.last_eval for m in sweep.members):
    print(f'warning: no member has {metric} yet (the members have {known}).', file=sys.stderr)
  pick, criterion = best(sweep.members, metric)
  if not args.metric and metric == 'final_loss' and any(m.evals for m in sweep.members):
    criterion += (f' ({" and ".join(DEFAULT_METRICS)} are missing for some done members or the '
                  'same for all; --metric chooses)')
  best_line = (f'Best member, {criterion}: {pick.name} ({fmt(metric, pick.value(metric))})'
               if pick else f'No best member yet ({criterion}).')
  out = args.out or args.sweep_dir
  os.makedirs(out, exist_ok=True)
  head, body = rows(sweep)
  plots = [paths.REPORT_LOSS] + [paths.report_plot(f) for f in sweep.fields]
  sweep_plots.plot_loss(os.path.join(out, plots[0]), sweep)
  for field, name in zip(sweep.fields, plots[1:]):
    sweep_plots.plot_field(os.path.join(out, name), sweep, field, metric, words=label(metric),
                           short=_short(sweep.fields), lower=lower_is_better(metric))
  write_csv(os.path.join(out, paths.REPORT_CSV), sweep)
  write_markdown(os.path.join(out, paths.REPORT_MD), sweep, head, body, f'**{best_line}**', plots)
  print(table(head, body))
  print(f'\n{best_line}')
  files = [paths.REPORT_MD, paths.REPORT_CSV] + plots
  print(f'Wrote {", ".join(os.path.join(out, n) for n in files)}')
  return 0


if __name__ == '__main__':
  sys.exit(main(prog='python -m launch.sweep_report'))
