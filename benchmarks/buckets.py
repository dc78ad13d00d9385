"""Aspect-ratio buckets: loader images/s against the square loader, and what switching shapes
between steps costs the train step.

  python -m benchmarks.buckets [--num_images=240] [--repeats=3] [--steps=40]

`loader`: a folder of JPEGs of 640x480, 480x640 and 512x512 (made once in a temporary folder),
`configs/images.py:gpu`'s data section at 64 px, batch 16, 0 workers and no prefetch; the square
loader (`data.pipeline`) and the bucketed one (`data.buckets`, data.bucket_max_aspect=2) are timed
in turn, A B A B, over the same batches. `switch`: `configs/images.py:tiny` on one device, the
train step alternating two bucket shapes each step against the first shape every step (both
compiled first), A B A B; the median ms/step of each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

SIZES = ((640, 480), (480, 640), (512, 512))  # (width, height): landscape, portrait, square.


def _folder(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  with open(os.path.join(root, 'metadata.jsonl'), 'w') as f:
    for i in range(n):
      w, h = SIZES[i % len(SIZES)]
      Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
          os.path.join(root, f'{i}.jpg'), quality=90)
      f.write(json.dumps({'file_name': f'{i}.jpg', 'text': f'picture {i}'}) + '\n')
  return root


def _loaders(folder: str):
  from configs import images, specs, validation  # pylint: disable=import-outside-toplevel
  from data import buckets, pipeline, sources  # pylint: disable=import-outside-toplevel
  config = images.get_config('gpu')
  config.data.update(path=folder, image_size=64, global_batch_size=16, num_workers=0, prefetch=0)
  square = specs.build(config)
  config.data.bucket_max_aspect = 2.0
  bucketed = specs.build(config)
  source = sources.make(square.data, 'train')
  t = time.perf_counter()
  bucket_loader = buckets.make_loader(bucketed.data, source, validation.size_step(bucketed))
  headers_s = time.perf_counter() - t
  return pipeline.make_loader(square.data, source), bucket_loader, headers_s


def _time_loader(loader, steps: range) -> float:
  t = time.perf_counter()
  n = sum(len(loader(s)['index']) for s in steps)
  return n / (time.perf_counter() - t)


def _switch(steps: int, repeats: int) -> dict:
  """ms/step of the tiny train step alternating two shapes vs one shape (compiled beforehand)."""
  import jax  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from configs import images, specs  # pylint: disable=import-outside-toplevel
  from runtime import sharding  # pylint: disable=import-outside-toplevel
  from training import builder  # pylint: disable=import-outside-toplevel
  config = images.get_config('tiny')
  config.text.vocab = 'shapes'
  config.data.path = tempfile.mkdtemp()  # Never read: the batches are synthetic.
  settings = specs.build(config)
  mesh = sharding.make_mesh(settings.mesh, jax.devices()[:1])
  trainer = builder.build_trainer(settings, mesh, workdir=config.data.path)
  state = trainer.init(jax.random.PRNGKey(0))
  b = settings.data.global_batch_size
  text = trainer.text_inputs.from_captions(['a picture'] * b)
  batches = [sharding.global_batch(mesh, {'bad': np.zeros(b, np.int32), **text,
                                          'image': np.zeros((b, h, w, 3), np.float32)})
             for h, w in ((12, 20), (20, 12))]
  rng, rules = jax.random.PRNGKey(1), settings.mesh.logical_axis_rules

  def run(state, pattern):
    t = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for i in range(steps):
        state, m = trainer.step(state, batches[pattern(i)], rng, trainer.frozen_weights,
                                trainer.vae_params)
      jax.block_until_ready(m['loss'])
    return state, 1000 * (time.perf_counter() - t) / steps

  state, _ = run(state, lambda i: i % 2)  # Compiles both shapes.
  fixed, switching = [], []
  for _ in range(repeats):
    state, ms = run(state, lambda i: 0)
    fixed.append(ms)
    state, ms = run(state, lambda i: i % 2)
    switching.append(ms)
  return {'fixed_ms': statistics.median(fixed), 'switching_ms': statistics.median(switching),
          'switch_ratio': statistics.median(s / f for s, f in zip(switching, fixed))}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--num_images', type=int, default=240)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--steps', type=int, default=40, help='Train steps per timing (switch).')
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    square, bucketed, headers_s = _loaders(_folder(tmp, args.num_images))
    steps = range(args.num_images // 16)
    _time_loader(square, range(2)), _time_loader(bucketed, range(2))  # Warm the file cache.
    rates = {'square': [], 'buckets': []}
    for _ in range(args.repeats):
      rates['square'].append(_time_loader(square, steps))
      rates['buckets'].append(_time_loader(bucketed, steps))
  out = {'square_img_s': statistics.median(rates['square']),
         'buckets_img_s': statistics.median(rates['buckets']),
         'loader_ratio': statistics.median(b / s for b, s in zip(rates['buckets'],
                                                                 rates['square'])),
         'header_read_s': round(headers_s, 3), **_switch(args.steps, args.repeats)}
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == '__main__':
  main()
