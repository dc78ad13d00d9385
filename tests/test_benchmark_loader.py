"""benchmarks/loader.py: the peer does our loader's work, and the script reports every row."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import loader as bench
from data import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peer_dataset_gives_our_loaders_picture(tmp_path):
  """The peer resizes the whole image then crops; ours resamples only the crop window: the same
  picture within a few levels (data/images.py), so both do the same job."""
  folder = bench.make_folder(str(tmp_path), 6)
  assert bench.make_folder(folder, 6) == folder  # Complete: reused, not written again.
  for size in (64, 256):  # Downscale (reducing_gap) and, for the portrait image 0, a taller crop.
    peer = bench.PeerDataset(folder, size)
    for i in (0, 1):
      pixels, caption = peer[i]
      with open(peer.items[i][0], 'rb') as f:
        ours = images.fit(images.load_rgb(f.read()), size).astype(np.float32) / 127.5 - 1.0
      assert pixels.shape == (size, size, 3) and pixels.dtype == np.float32
      np.testing.assert_allclose(pixels, ours, atol=4 / 127.5)
      assert np.abs(pixels - ours).mean() < 1.5 / 127.5
      assert caption == f'picture number {i}'
  assert {len(bench.synthetic_jpeg(i)) > 20_000 for i in range(2)} == {True}  # Realistic sizes.


@pytest.mark.full
def test_script_reports_ours_and_the_peer(tmp_path):
  out = tmp_path / 'out.json'
  cmd = [sys.executable, '-m', 'benchmarks.loader', '--mode=loaders,quickstart',
         f'--data_dir={tmp_path / "images"}', '--num_images=40', '--sizes=64', '--workers=0,1',
         '--repeats=1', '--batches=2', '--batch_size=8', f'--json_out={out}',
         '--quickstart_config=configs/shapes.py:tiny']
  env = {**os.environ, 'PYTHONPATH': ROOT}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = result['loaders']
  assert [(r['size'], r['workers']) for r in rows] == [(64, 0), (64, 1)]
  for r in rows:
    assert r['ours_img_per_s'] > 0 and r['ours_startup_s'] > 0 and len(r['ours']) == 1
  quick = result['quickstart']
  assert quick['batch_size'] == 8 and quick['batches_per_s'] > 0
  assert quick['headroom'] == pytest.approx(quick['batches_per_s'] / bench.QUICKSTART_STEPS_PER_S)
  assert '| 64 | 1 |' in proc.stdout
  pytest.importorskip('torch')
  for r in rows:
    assert r['peer_img_per_s'] > 0 and r['ratio'] > 0
    assert r['ratio'] == pytest.approx(r['ours'][0] / r['peer'][0])


@pytest.mark.full
def test_script_times_the_train_step(tmp_path):
  out = tmp_path / 'out.json'
  cmd = [sys.executable, '-m', 'benchmarks.loader', '--mode=train_step', '--train_steps=1',
         '--train_config=configs/shapes.py:tiny', '--config.optim.learning_rate=1e-4',
         f'--json_out={out}']
  env = {**os.environ, 'PYTHONPATH': ROOT}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step = json.loads(out.read_text())['train_step']
  assert step['batch_size'] == 8 and step['image_size'] == 16 and step['platform'] == 'cpu'
  assert step['img_per_s'] == pytest.approx(8 * step['steps_per_s']) and step['img_per_s'] > 0
  assert np.isfinite(step['loss'])
  assert step['overrides'] == ['--config.optim.learning_rate=1e-4']  # Passed to the config.
