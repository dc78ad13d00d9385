"""What a run writes (runtime/summaries.py, training/metrics.Reporter), and that none of it needs
TensorFlow: event files read back record by record, metrics.jsonl rows, log lines, the progress
and profiler hooks."""

import glob
import io
import json
import logging as pylogging
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import plugin_data_pb2

from configs import shapes, specs
from runtime import summaries
from training import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What train.py imports, then a Reporter's whole life on process 0 (hparams, steps, an eval grid).
_IMPORTS_AND_REPORTS = r'''
import sys, types
import numpy as np
import train
from configs import shapes, specs
from evaluation import sample_grid
from training import loop, metrics
from runtime import console, compile_cache, summaries
config = shapes.get_config('tiny')
reporter = metrics.Reporter(sys.argv[1], specs.build(config), is_main=True)
reporter.start(types.SimpleNamespace(params={'w': np.zeros((2, 3), np.float32)}), 0)
for step in range(config.optim.num_steps):
  reporter.step(step, 1.0, 0.5, 1e-3)
grid = np.zeros((8, 8, 3), np.uint8)
reporter.write_eval(4, summaries.EvalResult({'grid': grid}, {'all.full': 0.5}))
reporter.close()
print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))
'''


def read_events(path):
  """The Event protos of an event file, each record's length and data CRCs checked."""
  with open(path, 'rb') as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', data[pos + 8:pos + 12])[0] == masked_crc32c(header)
    body = data[pos + 12:pos + 12 + length]
    assert struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
    events.append(event_pb2.Event.FromString(body))
    pos += 16 + length
  return events


def values(events):
  """[(step, Summary.Value)] of every summary in `events`."""
  return [(e.step, v) for e in events for v in e.summary.value]


def test_training_and_its_reports_import_no_tensorflow(tmp_path):
  out = subprocess.run([sys.executable, '-c', _IMPORTS_AND_REPORTS, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == '[]'
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))


def test_event_file_holds_what_was_written(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path))
  hparams = {'optim.learning_rate': 0.001, 'model.channels': 16, 'data.dataset': 'shapes',
             'ema': True}
  writer.write_hparams(hparams)
  writer.write_scalars(2, {'train/loss': 0.25, 'steps_per_sec': 3.5})
  grid = np.random.default_rng(0).integers(0, 256, (1, 12, 20, 3), dtype=np.uint8)
  writer.write_images(4, {'grid': grid})
  writer.flush()
  # Flushed: on disk while the writer is still open (TensorBoard reads it during training).
  assert [os.path.basename(writer.path)] == os.listdir(tmp_path)
  assert len(read_events(writer.path)) == 4
  writer.close()

  events = read_events(writer.path)
  assert events[0].file_version == 'brain.Event:2'
  got = values(events)
  scalars = {v.tag: (step, v.simple_value) for step, v in got if v.HasField('simple_value')}
  assert scalars == {'train/loss': (2, 0.25), 'steps_per_sec': (2, 3.5)}
  [(step, image)] = [(step, v) for step, v in got if v.HasField('image')]
  assert (step, image.tag) == (4, 'grid')
  assert (image.image.height, image.image.width, image.image.colorspace) == (12, 20, 3)
  png = Image.open(io.BytesIO(image.image.encoded_image_string))
  np.testing.assert_array_equal(np.asarray(png), grid[0])
  [(step, start)] = [(step, v) for step, v in got if v.tag == '_hparams_/session_start_info']
  assert step == 0 and start.metadata.plugin_data.plugin_name == 'hparams'
  info = plugin_data_pb2.HParamsPluginData.FromString(start.metadata.plugin_data.content)
  stored = {k: getattr(v, v.WhichOneof('kind')) for k, v in info.session_start_info.hparams.items()}
  assert stored == hparams


def test_several_images_under_one_name_get_an_index(tmp_path):
  writer = summaries.EventFileWriter(str(tmp_path))
  writer.write_images(1, {'x': np.linspace(0, 1, 2 * 4 * 6).reshape(2, 4, 6, 1)})
  writer.close()
  images = [v for _, v in values(read_events(writer.path))]
  assert [(v.tag, v.image.height, v.image.width, v.image.colorspace) for v in images] == [
      ('x/0', 4, 6, 1), ('x/1', 4, 6, 1)]


def _tiny_reporter(tmp_path, *, is_main):
  config = shapes.get_config('tiny')
  config.optim.num_steps, config.logging.every_steps = 5, 2
  reporter = metrics.Reporter(str(tmp_path), specs.build(config), is_main=is_main)
  reporter.start(types.SimpleNamespace(params={'w': np.zeros((2, 3), np.float32)}), 0)
  for step in range(5):
    reporter.step(step, 1.0 / (step + 1), 0.5, 1e-3)
  reporter.write_eval(5, summaries.EvalResult({'grid': np.zeros((8, 8, 3), np.uint8)},
                                              {'all.full': 0.75}))
  reporter.close()
  return reporter


def test_reporter_rows_log_lines_and_summaries(tmp_path, caplog):
  caplog.set_level(pylogging.INFO)
  _tiny_reporter(tmp_path, is_main=True)
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  # The progress rows (steps 2, 4 and the last; the first call only starts the clock) and the
  # train rows (every 2 steps and the last), then the eval row.
  assert [(r['step'], sorted(r)) for r in rows] == [
      (2, ['step', 'steps_per_sec']), (2, ['step', 'uptime']), (2, TRAIN_KEYS),
      (4, ['step', 'steps_per_sec']), (4, ['step', 'uptime']), (4, TRAIN_KEYS),
      (5, ['step', 'steps_per_sec']), (5, ['step', 'uptime']), (5, TRAIN_KEYS),
      (5, ['eval/all.full', 'step'])]
  assert rows[2]['train/loss'] == pytest.approx((1 + 1 / 2) / 2)
  assert all(r['steps_per_sec'] > 0 for r in rows if 'steps_per_sec' in r)

  log = [r.getMessage() for r in caplog.records]
  assert any(line.startswith('[4] data/bad_records=0, train/grad_norm=0.5, ') for line in log)
  assert any(line.endswith(' steps/s, 80.0% (4/5), ETA: 0m') for line in log), log
  assert "[5] Got images: {'grid': (1, 8, 8, 3)}." in log

  [path] = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  got = values(read_events(path))
  assert sorted(step for step, v in got if v.tag == 'train/loss') == [2, 4, 5]
  assert [(step, v.image.height) for step, v in got if v.tag == 'grid'] == [(5, 8)]
  assert [step for step, v in got if v.tag == '_hparams_/session_start_info'] == [0]


TRAIN_KEYS = ['data/bad_records', 'step', 'train/grad_norm', 'train/images_per_sec',
              'train/learning_rate', 'train/loss', 'train/steps_per_sec']


def test_other_processes_only_log(tmp_path, caplog):
  caplog.set_level(pylogging.INFO)
  _tiny_reporter(tmp_path / 'run', is_main=False)
  assert not os.path.exists(tmp_path / 'run')
  assert any(r.getMessage().startswith('[5] data/bad_records=0') for r in caplog.records)


class _Rows:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, scalars))


def test_progress_reports_on_its_steps_and_after_a_minute():
  rows = _Rows()
  progress = summaries.ReportProgress(num_train_steps=10, writer=rows, every_steps=4)
  assert not progress(1, 100.0)  # Only starts the clock.
  assert [progress(s, 100.0 + s) for s in (2, 3, 4)] == [False, False, True]
  assert rows.rows[0] == (4, {'steps_per_sec': pytest.approx(3 / 4)})
  assert rows.rows[1][0] == 4 and list(rows.rows[1][1]) == ['uptime']
  assert progress(5, 104.0 + 61)  # Over every_secs since the last report.
  assert [progress(s, 170.0) for s in range(6, 10)] == [False, False, True, False]
  assert progress(10, 171.0)  # The last step.
  assert [step for step, _ in rows.rows] == [4, 4, 5, 5, 8, 8, 10, 10]


def test_format_secs():
  assert [summaries.format_secs(s) for s in (0, 59, 61, 3600, 123456.7)] == [
      '0m', '0m', '1m', '1h0m', '1d10h17m']


def test_profile_traces_the_steps_after_step_10(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(summaries.jax.profiler, 'start_trace', lambda d: calls.append(('start', d)))
  monkeypatch.setattr(summaries.jax.profiler, 'stop_trace', lambda: calls.append(('stop',)))
  profile = summaries.Profile(logdir=str(tmp_path), num_steps=3)
  for step in range(1, 13):
    profile(step)
    if step == 10:
      assert calls == [('start', str(tmp_path))]
  assert calls == [('start', str(tmp_path))]
  profile(13)
  assert calls[-1] == ('stop',)
  for step in range(14, 30):
    profile(step)
  profile.stop()
  assert len(calls) == 2  # One trace, stopped once.

  short = summaries.Profile(logdir=str(tmp_path), num_steps=100)
  for step in range(1, 12):
    short(step)
  short.stop()  # The run ended first (Reporter.close): the trace still ends.
  assert calls[2:] == [('start', str(tmp_path)), ('stop',)]
