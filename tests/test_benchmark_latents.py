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


def _run_vae_benchmark(tmp_path, *args):
  out = tmp_path / f'{args[0]}.json'
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.vae', *args, f'--json_out={out}'],
                        cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.full  # A benchmark script (the full tier holds them).
def test_vae_benchmark_memory_shrinks_with_chunks_and_speed_reports(tmp_path):
  """benchmarks/vae.py on a tiny VAE folder: decoding one latent per call needs fewer temporaries
  than the whole batch at once, and the speed mode reports both directions."""
  vae = write_vae(str(tmp_path / 'vae'))
  rows = _run_vae_benchmark(tmp_path, 'memory', f'--vae={vae}', '--sizes=32', '--batch=8',
                            '--chunks=0,1')
  assert [(r['size'], r['chunk']) for r in rows] == [(32, 8), (32, 1)]
  assert 0 < rows[1]['temp_gib'] < rows[0]['temp_gib']
  speed = _run_vae_benchmark(tmp_path, 'speed', f'--vae={vae}', '--size=16', '--batch=2',
                             '--rounds=1', '--steps=1')
  assert speed['encode_img_per_s'] > 0 and speed['decode_img_per_s'] > 0
