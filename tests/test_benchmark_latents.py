"""benchmarks/latents.py times the latent train step both ways and reports a positive ratio."""
import json
import os
import subprocess
import sys

import pytest

from tests.test_models_autoencoder import write_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.full
def test_latents_benchmark_reports_both_modes(tmp_path):
  vae = write_vae(str(tmp_path / 'vae'))  # Downsamples 2x: 16 px -> 8 x 8 x 4 latents.
  out = tmp_path / 'out.json'
  cmd = [sys.executable, '-m', 'benchmarks.latents', '--config=configs/shapes.py:tiny',
         '--config.data.dataset=shapes_rendered', f'--config.autoencoder.path={vae}',
         '--rounds=1', '--steps=1', f'--json_out={out}']
  proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT},
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['latent_shape'] == [8, 8, 4]
  assert result['on_the_fly_img_per_s'] > 0 and result['cached_img_per_s'] > 0
  assert result['ratio_cached_over_fly'] > 0
