"""Images per second of an evaluation feature extractor (jitted, warm, float32).

  PYTHONPATH=. .venv/bin/python -m benchmarks.extractors --extractor=inception --batch=32 \
      [--size=299] [--weights=pt_inception-2015-12-05-6726825d.pth] [--json_out=FILE]

`inception`: `evaluation.inception.features` (FID Inception-v3 pool3) on `--size` px float images
in [0, 1], resized to 299 inside the jitted function (none at 299). Without `--weights` the
weights are random in pytorch-fid's layout (tools/random_inception.py): speed does not depend on
the values. Prints compile time and the median images/s over `--rounds` of `--steps` batches.
"""
import argparse
import json
import statistics
import time

import jax
import numpy as np


def inception_extractor(weights: str):
  from evaluation import inception  # pylint: disable=g-import-not-at-top
  if weights:
    params = inception.load(weights).params
  else:
    from tools.random_inception import random_state_dict  # pylint: disable=g-import-not-at-top
    params = inception.convert(random_state_dict(0), 'random weights')
  return inception.features, jax.device_put(params)


EXTRACTORS = {'inception': inception_extractor}


def run(args) -> dict:
  fn, params = EXTRACTORS[args.extractor](args.weights)
  images = jax.device_put(
      np.random.default_rng(0).random((args.batch, args.size, args.size, 3), np.float32))
  t = time.perf_counter()
  jax.block_until_ready(fn(params, images))
  out = {'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
         'extractor': args.extractor, 'batch': args.batch, 'size': args.size,
         'weights': args.weights or 'random', 'compile_s': time.perf_counter() - t}
  rates = []
  for _ in range(args.rounds):
    t = time.perf_counter()
    for _ in range(args.steps):
      y = fn(params, images)
    jax.block_until_ready(y)
    rates.append(args.steps * args.batch / (time.perf_counter() - t))
  out['img_per_s'] = statistics.median(rates)
  out['img_per_s_rounds'] = rates
  print(f"{out['device']}, {args.extractor}, batch {args.batch}, {args.size} px: "
        f"{out['img_per_s']:.2f} img/s (compile {out['compile_s']:.1f} s)", flush=True)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--extractor', choices=sorted(EXTRACTORS), default='inception')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--size', type=int, default=299, help='input side before the resize')
  parser.add_argument('--weights', default='', help='weights file ("" = random)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--json_out', default='')
  args = parser.parse_args(argv)
  out = run(args)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main()
