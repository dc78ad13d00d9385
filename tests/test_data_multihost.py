"""1 process and 2 processes (localhost, gloo) assemble identical global batches from a folder."""
import subprocess
import sys

import numpy as np
import pytest

from tests import image_folders
from tests.test_multihost_training import REPO, _clean_env


def _run(cmd, timeout=300):
  out = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]


@pytest.mark.full
def test_one_and_two_processes_assemble_the_same_global_batches(tmp_path):
  image_folders.make_folder(tmp_path / 'images')
  script = [sys.executable, '-m', 'tests.global_batches', f'--data_path={tmp_path / "images"}']
  one, two = str(tmp_path / 'one.npz'), str(tmp_path / 'two.npz')
  _run([sys.executable, '-m', 'launch.local', '--num_processes', '1', '--devices_per_process',
        '4', '--', *script, f'--out={one}'])
  _run([sys.executable, '-m', 'launch.local', '--num_processes', '2', '--devices_per_process',
        '2', '--', *script, f'--out={two}'])
  a, b, b1 = np.load(one), np.load(two), np.load(two + '.p1.npz')  # Process 1 wrote its own.
  assert len(b['caption_0_p0']) == len(b1['caption_0_p1']) == 4  # Each loaded half a batch.
  for step in range(3):
    for key in ('image', 'index', 'bad'):
      np.testing.assert_array_equal(a[f'{key}_{step}'], b[f'{key}_{step}'])
      assert a[f'{key}_{step}'].shape[0] == 8
    captions = np.concatenate([b[f'caption_{step}_p0'], b1[f'caption_{step}_p1']])
    np.testing.assert_array_equal(a[f'caption_{step}_p0'], captions)
  assert sum(int(a[f'bad_{s}'].sum()) for s in range(3)) > 0  # The broken files were met.
