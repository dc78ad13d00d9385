"""launch.sweep_report on a sweep folder written by hand (no training): a 2 x 2 grid over
optim.learning_rate and text.cond_drop_prob with one done member with eval scores, one done
without, one failed and one running; the table, the best member, report.md / .csv and the plots.
Also the names of a workdir's files and the member names the sweep writes and the report reads."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from launch import member, sweep, sweep_plots, sweep_report
from runtime import workdir as paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, DROP = 'optim.learning_rate', 'text.cond_drop_prob'
HOUR_AGO = time.time() - 3600
EVAL = {'eval/all.n': 16.0, 'eval/all.full': 0.25, 'eval/all.n_full': 16.0, 'eval/all.colour': 0.75,
        'eval/all.shape': 0.5, 'eval/all.count': 0.875, 'eval/all.left_right': 0.5,
        'eval/all.n_left_right': 4.0, 'eval/held_out.full': 0.0}
ERROR_LOG = """Traceback (most recent call last):
  File "train.py", line 32, in main
    console.run_or_exit(_train, verbose=_VERBOSE.value, log_dir=_WORKDIR.value)
FloatingPointError: loss is nan at step 3
error: loss is nan at step 3; lower optim.learning_rate or raise optim.warmup_steps
"""


def _name(lr, p):
  return f'learning_rate={lr}_cond_drop_prob={p}'


def _member(root, lr, p, losses, *, checkpoints=(), evals=None, runner=None, error=None,
            fresh=False, torn_line=False):
  """A member's workdir as train.py and the local runner leave it."""
  workdir = root / _name(lr, p)
  workdir.mkdir()
  rows = [{'step': 1, 'steps_per_sec': 2.0}]  # clu's progress line: no train/ prefix.
  rows += [{'step': i + 1, 'train/loss': loss, 'train/grad_norm': 1.0,
            'train/steps_per_sec': 2.0 + i, 'train/images_per_sec': 8 * (2.0 + i)}
           for i, loss in enumerate(losses)]
  if evals:
    rows.append({'step': len(losses), **evals})
  text = ''.join(json.dumps(r) + '\n' for r in rows)
  (workdir / 'metrics.jsonl').write_text(text + ('{"step": 2, "train/lo' if torn_line else ''))
  for step in checkpoints:  # What orbax leaves: metadata, and the config as a JSON item.
    folder = workdir / 'checkpoints' / str(step)
    (folder / 'config').mkdir(parents=True)
    (folder / '_CHECKPOINT_METADATA').write_text('{}')
    (folder / 'config' / 'metadata').write_text(json.dumps({'optim': {'num_steps': 4}}))
  (workdir / 'checkpoints' / '6.orbax-checkpoint-tmp').mkdir(parents=True)  # A save under way.
  if runner:
    runner = {'overrides': {LR: lr, DROP: p}, 'returncode': None, 'started': HOUR_AGO - 60,
              'ended': None, **runner}
    (workdir / 'sweep_member.json').write_text(json.dumps(runner))
  if not fresh:
    os.utime(workdir / 'metrics.jsonl', (HOUR_AGO, HOUR_AGO))
  if error:
    (workdir / 'error.log').write_text(error)
    os.utime(workdir / 'error.log', (HOUR_AGO + 5, HOUR_AGO + 5))
  return workdir


@pytest.fixture
def sweep_dir(tmp_path):
  root = tmp_path / 'lr_sweep'
  root.mkdir()
  members = [('0.001', '0.1'), ('0.001', '0.2'), ('0.002', '0.1'), ('0.002', '0.2')]
  _member(root, '0.001', '0.1', [0.9, 0.7, 0.5, 0.45], checkpoints=(2, 4), evals=EVAL,
          runner={'status': 'done', 'returncode': 0})
  _member(root, '0.001', '0.2', [0.8, 0.6, 0.3, 0.35], checkpoints=(2, 4))  # No runner file.
  _member(root, '0.002', '0.1', [1.0, 0.9], checkpoints=(2,), error=ERROR_LOG)
  _member(root, '0.002', '0.2', [1.1], runner={'status': 'running'}, fresh=True, torn_line=True)
  (root / 'sweep.json').write_text(json.dumps({
      'config': 'configs/shapes.py:tiny', 'extra': ['--config.optim.num_steps=4'],
      'members': [{'name': _name(lr, p), 'overrides': {LR: lr, DROP: p},
                   'workdir': str(root / _name(lr, p))} for lr, p in members]}))
  return root


def _by_lr_drop(sweep):
  return {(m.overrides[LR], m.overrides[DROP]): m for m in sweep.members}


def test_members_statuses_losses_and_eval_scores(sweep_dir):
  sweep = sweep_report.collect(str(sweep_dir))
  assert sweep.fields == [LR, DROP] and len(sweep.members) == 4
  m = _by_lr_drop(sweep)
  assert {k: v.status for k, v in m.items()} == {
      ('0.001', '0.1'): 'done', ('0.001', '0.2'): 'done', ('0.002', '0.1'): 'failed',
      ('0.002', '0.2'): 'running'}
  done_eval, done, failed, running = m.values()
  assert (done_eval.step, done_eval.num_steps) == (4, 4) and (failed.step, running.step) == (2, 1)
  assert (done.final_loss, done.best_loss) == (0.35, 0.3)  # The last logged, and the lowest.
  assert (failed.final_loss, running.final_loss) == (0.9, 1.1)  # (The torn line is skipped.)
  assert done_eval.evals == {k: EVAL[k] for k in ('eval/all.full', 'eval/all.colour',
                                                 'eval/all.shape', 'eval/all.count',
                                                 'eval/all.left_right')}
  assert done.evals == {} and done_eval.steps_per_sec == 3.5  # Median of 2, 3, 4, 5.
  assert failed.failure == ('error: loss is nan at step 3; lower optim.learning_rate or raise '
                            'optim.warmup_steps')


def test_report_files_table_and_best_member(sweep_dir, capsys):
  assert sweep_report.main([str(sweep_dir)]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  head = lines[0].split()
  assert head[:6] == ['learning_rate', 'cond_drop_prob', 'status', 'step', 'final', 'loss']
  assert ['full', 'colour', 'shape', 'count', 'left_right', 'steps/s', 'note'] == head[-7:]
  rows = {tuple(l.split()[:2]): l.split() for l in lines[1:5]}
  assert rows[('0.001', '0.1')][2:] == ['done', '4/4', '0.4500', '0.4500', '25.0%', '75.0%',
                                        '50.0%', '87.5%', '50.0%', '3.50']
  assert rows[('0.001', '0.2')][2:] == ['done', '4/4', '0.3500', '0.3000'] + ['-'] * 5 + ['3.50']
  assert rows[('0.002', '0.1')][2:4] == ['failed', '2/4'] and 'error: loss is nan' in lines[3]
  assert rows[('0.002', '0.2')][2:4] == ['running', '1/4']
  # Columns line up: every row's status starts where the header's does.
  assert len({l.index(r[2], len(r[0]) + len(r[1])) for l, r in zip(lines[1:5], rows.values())}
             | {lines[0].index('status')}) == 1
  # One done member has no eval score: the best is by final loss, and the line says why.
  best = next(l for l in lines if l.startswith('Best member'))
  assert best == ('Best member, by final train loss, lowest of 2 done members (eval/all.full and '
                  'eval/val_loss are missing for some done members or the same for all; '
                  '--metric chooses): '
                  'learning_rate=0.001_cond_drop_prob=0.2 (0.3500)')

  with open(sweep_dir / 'report.csv', newline='') as f:
    table = list(csv.DictReader(f))
  assert [r['status'] for r in table] == ['done', 'done', 'failed', 'running']
  assert table[0][LR] == '0.001' and table[0][DROP] == '0.1'
  assert float(table[0]['eval/all.full']) == 0.25 and table[1]['eval/all.full'] == ''
  assert float(table[1]['final_loss']) == 0.35 and float(table[1]['best_loss']) == 0.3
  assert table[2]['failure'].startswith('error: loss is nan at step 3')

  md = (sweep_dir / 'report.md').read_text()
  assert md.count('\n| 0.00') == 4 and best in md
  plots = ['report_loss.png', f'report_{LR}.png', f'report_{DROP}.png']
  for name in plots:
    assert f']({name})' in md
    with Image.open(sweep_dir / name) as img:
      assert img.format == 'PNG' and img.width >= 600 and 400 <= img.height <= 1200
      colours = set(img.convert('RGB').getdata())
    # One colour per line: the loss plot has the 4 members, the value plots 2 groups each.
    want = sweep_plots._PALETTE[:4 if name == 'report_loss.png' else 2]
    assert all(c in colours for c in want), name


def test_metric_option_picks_the_best_by_eval_score(sweep_dir, capsys):
  out_dir = sweep_dir / 'by_full'
  assert sweep_report.main([str(sweep_dir), '--metric=eval/all.full', f'--out={out_dir}']) == 0
  assert ('Best member, by eval/all.full, highest of 1 done member: '
          'learning_rate=0.001_cond_drop_prob=0.1 (25.0%)') in capsys.readouterr().out
  assert sorted(os.listdir(out_dir)) == sorted(['report.md', 'report.csv', 'report_loss.png',
                                                f'report_{LR}.png', f'report_{DROP}.png'])
  # A score no member has yet (the first evaluation is still to come): said, but not an error.
  assert sweep_report.main([str(sweep_dir), '--metric=eval/all.speed', f'--out={out_dir}']) == 0
  out, err = capsys.readouterr()
  assert 'No best member yet (by eval/all.speed: no member has it yet).' in out
  assert 'eval/all.colour' in err  # The warning lists what there is.
  with pytest.raises(SystemExit) as e:
    sweep_report.main([str(sweep_dir), '--metric=speed'])
  assert e.value.code == 2 and 'eval/all.colour' in capsys.readouterr().err


def test_cli_prints_the_table(sweep_dir):
  out = subprocess.run([sys.executable, '-m', 'launch.sweep_report', str(sweep_dir)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[0].startswith('learning_rate  cond_drop_prob  status')
  assert 'running' in out.stdout and 'report_loss.png' in out.stdout


def test_folder_without_sweep_json(sweep_dir, capsys):
  """A SLURM array: only the members' workdirs; num_steps from the checkpoints' saved config,
  the swept fields from the runner's files and the folder names."""
  (sweep_dir / 'sweep.json').unlink()
  shutil.rmtree(sweep_dir / _name('0.002', '0.2'))  # No runner file left to say 'running'.
  (sweep_dir / 'notes').mkdir()  # Not a member: no metrics.jsonl, no checkpoints/.
  sweep = sweep_report.collect(str(sweep_dir))
  assert sweep.config is None and sweep.fields == [LR, DROP]
  assert [(m.overrides, m.status, m.num_steps) for m in sweep.members] == [
      ({LR: '0.001', DROP: '0.1'}, 'done', 4), ({LR: '0.001', DROP: '0.2'}, 'done', 4),
      ({LR: '0.002', DROP: '0.1'}, 'failed', 4)]
  assert sweep_report.main([str(sweep_dir)]) == 0
  assert (sweep_dir / 'report.md').is_file() and 'failed' in capsys.readouterr().out


def test_pending_stopped_and_a_resumed_failure(sweep_dir):
  failed, running = sweep_dir / _name('0.002', '0.1'), sweep_dir / _name('0.002', '0.2')
  # Resumed since it failed: error.log is older than the last metrics line.
  os.utime(failed / 'metrics.jsonl', (HOUR_AGO + 10, HOUR_AGO + 10))
  shutil.rmtree(running)  # Not started yet.
  m = _by_lr_drop(sweep_report.collect(str(sweep_dir)))
  assert m[('0.002', '0.1')].status == 'stopped' and m[('0.002', '0.1')].failure == ''
  assert m[('0.002', '0.2')].status == 'pending' and m[('0.002', '0.2')].step is None
  # The runner's word when there is no error.log: its failure line, else its exit status.
  (failed / 'error.log').unlink()
  runner = {'status': 'failed', 'returncode': 7, 'failure': 'error: no such file: data.tfrecord'}
  (failed / 'sweep_member.json').write_text(json.dumps(runner))
  m = _by_lr_drop(sweep_report.collect(str(sweep_dir)))
  assert (m[('0.002', '0.1')].status, m[('0.002', '0.1')].failure) == ('failed', runner['failure'])
  del runner['failure']
  (failed / 'sweep_member.json').write_text(json.dumps(runner))
  m = _by_lr_drop(sweep_report.collect(str(sweep_dir)))
  assert (m[('0.002', '0.1')].status, m[('0.002', '0.1')].failure) == ('failed', 'exit status 7')


def test_a_member_killed_by_a_signal_before_the_runner_said_so(sweep_dir):
  """A runner record of an older version: a signal's return code and the console's last line, a
  progress bar. The report says the signal, the last step and how it resumes, and no longer the
  error.log of an attempt before it (older than its last metrics)."""
  failed = sweep_dir / _name('0.002', '0.1')
  os.utime(failed / 'metrics.jsonl', (HOUR_AGO + 10, HOUR_AGO + 10))
  runner = {'status': 'failed', 'returncode': -9, 'started': HOUR_AGO,
            'failure': 'train:  12%|###8      | 2/4 [00:01<00:02, loss=0.6017]'}
  (failed / 'sweep_member.json').write_text(json.dumps(runner))
  m = _by_lr_drop(sweep_report.collect(str(sweep_dir)))[('0.002', '0.1')]
  assert (m.status, m.failure) == (
      'failed', 'killed by SIGKILL after step 2; running the sweep again resumes it from step 2')
  shutil.rmtree(failed / 'checkpoints')
  runner['returncode'] = -15
  (failed / 'sweep_member.json').write_text(json.dumps(runner))
  m = _by_lr_drop(sweep_report.collect(str(sweep_dir)))[('0.002', '0.1')]
  assert m.failure == ('killed by SIGTERM after step 2; running the sweep again starts it again '
                       '(no checkpoint yet)')


def test_failure_line_of_a_plain_traceback(tmp_path):
  log = tmp_path / 'error.log'
  log.write_text(ERROR_LOG.rsplit('error:', 1)[0])  # What console.run_or_exit writes itself.
  assert sweep_report.failure_line(str(log)) == 'FloatingPointError: loss is nan at step 3'


def test_a_resumed_run_logs_its_replayed_steps_again(sweep_dir):
  """Back from the step-2 checkpoint after a NaN at step 3: step 3 is logged twice, and the NaN
  is no best loss."""
  workdir = sweep_dir / _name('0.001', '0.2')
  rows = [(1, 0.8), (2, 0.6), (3, float('nan')), (3, 0.5), (4, 0.4)]
  (workdir / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'train/loss': l}) + '\n' for s, l in rows))
  m = _by_lr_drop(sweep_report.collect(str(sweep_dir)))[('0.001', '0.2')]
  assert m.losses == [(1, 0.8), (2, 0.6), (3, 0.5), (4, 0.4)]
  assert (m.final_loss, m.best_loss, m.status) == (0.4, 0.4, 'done')


def test_loss_curves_are_smoothed_over_a_trailing_window():
  from launch import sweep_plots  # pylint: disable=g-import-not-at-top
  points = [(s, float(s % 2)) for s in range(1, 101)]  # 0, 1, 0, 1, ...: k = 3.
  smoothed = sweep_plots.smooth(points)
  assert [s for s, _ in smoothed] == list(range(1, 101))
  assert smoothed[0][1] == 1.0 and smoothed[1][1] == 0.5  # Fewer points than k at the start.
  assert all(abs(y - (1 / 3 if s % 2 == 0 else 2 / 3)) < 1e-9 for s, y in smoothed[2:])
  assert sweep_plots.smooth(points[:10]) == points[:10]  # Short series: as they are.


def test_workdir_names_are_the_ones_old_workdirs_have(tmp_path):
  """Renaming any of these would leave the workdirs and sweeps written so far unreadable."""
  assert (paths.CHECKPOINTS, paths.CHECKPOINT_MARKER, paths.METRICS, paths.TRAIN_LOG,
          paths.ERROR_LOG, paths.SAMPLES, paths.TEXT_CACHE, paths.CONSOLE_LOG, paths.MEMBER_FILE,
          paths.SWEEP_FILE) == (
              'checkpoints', '_CHECKPOINT_METADATA', 'metrics.jsonl', 'train.log', 'error.log',
              'samples', 'text_cache', 'console.log', 'sweep_member.json', 'sweep.json')
  w = str(tmp_path)
  assert paths.set_aside(w, paths.CORRUPT) == f'{w}/checkpoints.corrupt'
  assert paths.set_aside(w, paths.IGNORED) == f'{w}/checkpoints.ignored'
  assert paths.sample_png(w, 'grid', 40) == f'{w}/samples/grid_0000040.png'
  os.makedirs(paths.samples(w))
  for step in (40, 12345678, 5):
    Image.new('RGB', (1, 1)).save(paths.sample_png(w, 'grid', step))
  assert paths.sample_pngs(w, 'grid') == [paths.sample_png(w, 'grid', s) for s in (5, 40, 12345678)]


# (overrides, the member's name, what the report reads back from the name alone)
AWKWARD = [
    ({'optim.learning_rate': '1e-3', 'text.cond_drop_prob': '0.1'},  # Plain: named as always.
     'learning_rate=1e-3_cond_drop_prob=0.1', {'learning_rate': '1e-3', 'cond_drop_prob': '0.1'}),
    ({'model.remat': 'dots_saveable', 'optim.schedule': 'warmup_cosine'},  # '_' before a field.
     'remat=dots%5Fsaveable_schedule=warmup%5Fcosine',
     {'remat': 'dots_saveable', 'schedule': 'warmup_cosine'}),
    ({'data.path': '/data/a=b_c', 'optim.learning_rate': '-2e-3'},  # '/', '=' and '_'.
     'path=%2Fdata%2Fa%3Db%5Fc_learning_rate=-2e-3',
     {'path': '/data/a=b_c', 'learning_rate': '-2e-3'}),
    ({'model.dropout': '0.1', 'text.dropout': '0.2'},  # Two fields, one last part.
     'model.dropout=0.1_text.dropout=0.2', {'model.dropout': '0.1', 'text.dropout': '0.2'}),
    ({'logging.eval_prompts': 'a red circle, 50%', 'text.max_len': ''},  # ' ', ',', '%', empty.
     'eval_prompts=a%20red%20circle%2C%2050%25_max_len=',
     {'eval_prompts': 'a red circle, 50%', 'max_len': ''}),
    ({'text.pretrained_path': 'Modèle_€'},  # Not ASCII.
     'pretrained_path=Mod%C3%A8le%5F%E2%82%AC', {'pretrained_path': 'Modèle_€'}),
    ({}, 'base', {}),
]


@pytest.mark.parametrize('point,name,read', AWKWARD, ids=range(len(AWKWARD)))
def test_member_names_written_by_the_sweep_are_read_back_by_the_report(tmp_path, point, name,
                                                                       read):
  """A SLURM array leaves no sweep.json and no runner file: the report has only the names."""
  root = tmp_path / 'sweep'
  [cmd] = sweep.commands('configs/shapes.py:tiny', str(root), [point])
  assert f'--workdir={root / name}' in cmd  # One folder of ROOT per member, whatever its values.
  (root / name).mkdir(parents=True)
  (root / name / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 0.5}\n')
  [m] = sweep_report.collect(str(root)).members
  assert (m.name, m.overrides) == (name, read)


def test_a_member_folder_named_before_values_were_escaped_is_resumed(tmp_path):
  point = {'model.remat': 'dots_saveable'}
  assert member.folder(str(tmp_path), point) == str(tmp_path / 'remat=dots%5Fsaveable')
  (tmp_path / 'remat=dots_saveable').mkdir()  # Written by an earlier version of the sweep.
  assert member.folder(str(tmp_path), point) == str(tmp_path / 'remat=dots_saveable')
  assert member.parse_name('remat=dots_saveable') == {'remat': 'dots_saveable'}


def test_without_shapes_scores_the_validation_loss_picks_the_best():
  """Own-images runs have no eval/all.full: the lowest eval/val_loss wins, not the train loss."""
  members = [sweep_report.Member(name=n, workdir='', overrides={}, status='done', step=4,
                                 num_steps=4, final_loss=loss, best_loss=loss,
                                 last_eval={'eval/val_loss': val})
             for n, loss, val in (('a', 0.2, 0.9), ('b', 0.5, 0.4))]
  metric = sweep_report.default_metric(members)
  assert metric == 'eval/val_loss'
  assert sweep_report.best(members, metric)[0].name == 'b'


def test_fid_kid_and_cmmd_rank_lowest_first_clip_score_highest():
  assert all(sweep_report.lower_is_better(f'eval/{m}') for m in ('fid', 'kid', 'cmmd', 'val_loss'))
  assert not sweep_report.lower_is_better('eval/clip_score')
  assert sweep_report.fmt('eval/kid', 0.0042) == '0.0042'
