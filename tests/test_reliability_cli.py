"""sample.py and evaluate.py refuse what cannot work with one `error:` line: flags checked before
anything is loaded (no empty manifest is left behind), a damaged checkpoint named without the
tracebacks of orbax's background reads."""
import glob
import logging
import os
import shutil
import subprocess
import sys

import pytest

from runtime import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def only_error_line(proc):
  """The one `error:` line of a failed command (and no traceback)."""
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize('flags, message', [
    (['--num=0'], '--num=0 must be >= 1'),
    (['--batch_size=0'], '--batch_size=0 must be >= 1'),
    (['--steps=0'], '--steps=0 must be >= 1'),
    (['--guidance=-1'], '--guidance=-1.0 must be >= 0 (0: unconditional'),
    (['--threshold=120'], '--threshold=120.0 must be a percentile in [0, 100]'),
    (['--guidance_interval=2,1'], '--guidance_interval=2,1 must be lo,hi with lo <= hi'),
    (['--image_size=0'], '--image_size=0 must be >= 1'),
    (['--height=16'], '--height and --width go together'),
    (['--height=16', '--width=24', '--image_size=16'], 'pass --image_size (a square) or --height'),
    (['--height=0', '--width=8'], '--height=0 must be >= 1'),
])
def test_sample_flags_are_checked_before_loading(tmp_path, flags, message):
  out = tmp_path / 'out'
  proc = run('sample.py', f'--workdir={tmp_path}', '--prompt=a red circle', f'--out={out}', *flags)
  assert message in only_error_line(proc)
  assert not out.exists()  # Nothing written (the empty manifest of before).


def test_sample_names_a_missing_workdir(tmp_path):
  proc = run('sample.py', f'--workdir={tmp_path / "nowhere"}', '--prompt=a')
  assert only_error_line(proc) == f'error: --workdir={tmp_path / "nowhere"}: no such folder.'


def test_sample_names_a_missing_prompt_file_and_no_prompts(tmp_path):
  proc = run('sample.py', f'--workdir={tmp_path}', f'--prompt_file={tmp_path / "p.txt"}')
  assert only_error_line(proc) == (f'error: --prompt_file={tmp_path / "p.txt"}: no such file (one '
                                   'prompt per line).')
  (tmp_path / 'p.txt').write_text('\n  \n')
  proc = run('sample.py', f'--workdir={tmp_path}', f'--prompt_file={tmp_path / "p.txt"}')
  assert only_error_line(proc).startswith('error: no prompts: pass --prompt')


def test_evaluate_names_a_folder_without_a_manifest(tmp_path):
  proc = run('evaluate.py', f'--samples={tmp_path}')
  assert only_error_line(proc).startswith(f'error: No manifest at {tmp_path}/manifest.jsonl')


def _record(message, exception):
  return logging.LogRecord('asyncio', logging.ERROR, __file__, 1, message, None,
                           (type(exception), exception, exception.__traceback__))


def test_orphaned_reads_of_a_failed_restore_are_dropped():
  """asyncio reports the reads a failed restore left behind as 'Task/Future/_GatheringFuture
  exception was never retrieved' (a future may have no traceback, only tensorstore's text); those
  go, anything else stays."""
  drop = console._OrphanedRestoreTasks().filter  # pylint: disable=protected-access
  damaged = ValueError('OUT_OF_RANGE: Error reading "x/.zarray" [tensorstore_spec=\'{}\']')
  assert not drop(_record('Future exception was never retrieved\nfuture: <Future>', damaged))
  assert not drop(_record('Task exception was never retrieved\nfuture: <Task>', damaged))
  assert not drop(_record('_GatheringFuture exception was never retrieved\nfuture: <...>',
                          damaged))  # orbax's asyncio.gather of the reads (seen in CI).
  other = ValueError('a bug of ours')
  assert drop(_record('Future exception was never retrieved\nfuture: <Future>', other))
  assert drop(_record('Task exception was never retrieved\nfuture: <Task>', other))
  assert drop(_record('Unclosed client session', damaged))


@pytest.mark.full  # Two sample.py runs on the trained tiny workdir.
def test_sample_names_a_damaged_checkpoint_in_one_line(tiny_run, tmp_path):
  """--step of a truncated checkpoint: its step and path in one line; without --step the newest
  intact one is used, with a warning."""
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_run.workdir, workdir)
  files = glob.glob(str(workdir / 'checkpoints' / '4' / 'state' / '**' / 'd' / '*'), recursive=True)
  for path in files:
    os.truncate(path, os.path.getsize(path) // 2)
  proc = run('sample.py', f'--workdir={workdir}', '--prompt=a red circle', '--steps=2', '--step=4',
             f'--out={tmp_path / "s4"}')
  line = only_error_line(proc)
  assert line.startswith(f'error: --step=4: the checkpoint {workdir}/checkpoints/4 cannot be '
                         'restored')
  assert 'Event loop is closed' not in proc.stderr
  ok = run('sample.py', f'--workdir={workdir}', '--prompt=a red circle', '--steps=2',
           f'--out={tmp_path / "latest"}')
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert f'Checkpoint step 4 at {workdir}/checkpoints/4 could not be restored' in ok.stderr
  assert '"checkpoint_step": 2' in ok.stdout
  assert 'Traceback' not in ok.stderr
