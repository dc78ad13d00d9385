"""Per-step training cost of the text encoder: scratch, pretrained MiniLM, and MiniLM with cache.

  .venv/bin/python -m benchmarks.text_encoder_cost --out=/tmp/enc_cost [--steps=60]

Trains the Shapes `cpu` config for a few steps in each mode and reports the steady-state
steps/s (the first logging interval, which includes compilation, is dropped), as ratios
against the scratch encoder measured in the same run.
"""

import argparse
import json
import os

from configs import shapes
from training import loop

MODES = {
    'scratch': {'text.encoder': 'scratch', 'text.cache_embeddings': False},
    'pretrained': {'text.encoder': 'pretrained', 'text.cache_embeddings': False},
    'pretrained_cached': {'text.encoder': 'pretrained', 'text.cache_embeddings': True},
}


def steady_steps_per_sec(workdir: str) -> float:
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  rates = [r['train/steps_per_sec'] for r in rows if 'train/steps_per_sec' in r][1:]
  return sum(rates) / len(rates)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args(argv)
  results = {}
  for mode, overrides in MODES.items():
    config = shapes.get_config('cpu')
    config.optim.num_steps = args.steps
    config.logging.every_steps = 10
    config.logging.eval_at_end = False
    config.checkpoint.every_steps = args.steps
    config.data.data_dir = args.data_dir
    for key, value in overrides.items():
      section, field = key.split('.')
      config[section][field] = value
    workdir = os.path.join(args.out, mode)
    loop.train_and_evaluate(config, workdir)
    results[mode] = steady_steps_per_sec(workdir)
    print(mode, f'{results[mode]:.2f} steps/s', flush=True)
  base = results['scratch']
  for mode, rate in results.items():
    print(f'| {mode} | {rate:.2f} | {rate / base:.2f}x |')
  with open(os.path.join(args.out, 'encoder_cost.json'), 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
