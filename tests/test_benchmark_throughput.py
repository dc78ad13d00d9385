"""benchmarks/throughput.py on the tiny config: every figure present and sane, peer A/B when torch is
installed (it is an optional peer; the test of the ratio skips without it). The train step runs on
the 8 simulated devices, so its batches are multiples of 8."""
import importlib.util
import json

import pytest

from benchmarks import throughput

pytestmark = pytest.mark.full


@pytest.mark.parametrize('peer', [False, True])
def test_throughput_reports_train_and_sampler_figures(tmp_path, peer):
  if peer and not (importlib.util.find_spec('torch') and importlib.util.find_spec('diffusers')):
    pytest.skip('torch and diffusers are optional peers')
  out = tmp_path / 'figures.json'
  throughput.main(['--config=configs/shapes.py:tiny', '--batch=8,16', '--rounds=2', '--steps=1',
                   '--sampler', '--sample_batch=2', '--sample_steps=2', '--peak_tflops=1',
                   f'--out={out}'] + (['--peer', '--threads=1'] if peer else []))
  rows = json.loads(out.read_text())['rows']
  train = [r for r in rows if r['what'] == 'train']
  assert [r['batch'] for r in train] == [8, 16]
  for r in train:
    assert 0 < r['step_s']['min'] <= r['step_s']['median'] <= r['step_s']['max']
    assert r['images_per_s'] == pytest.approx(r['batch'] / r['step_s']['median'])
    assert r['flops_per_image'] > 1e6 and r['memory_gib'] > 0 and 0 < r['mfu'] < 1
    assert r['compile_s'] == pytest.approx(r['trace_s'] + r['xla_compile_s'])
    if peer:
      assert r['ratio']['median'] > 0 and r['peer_step_s']['median'] > 0
      # The peer runs our layers: the same parameter count up to the norms (under 1%).
      assert abs(r['params']['peer'] / r['params']['ours'] - 1) < 0.01
  # Cost analysis counts the same work per image at both batch sizes (within 10%).
  assert train[1]['flops_per_image'] == pytest.approx(train[0]['flops_per_image'], rel=0.1)
  (sample,) = [r for r in rows if r['what'] == 'sample']
  assert sample['batch'] == 2 and sample['steps'] == 2 and sample['images_per_s'] > 0
  assert ('ratio' in sample) == peer
