"""Per-step training cost of the text encoder: scratch, pretrained MiniLM, and MiniLM with cache.

  .venv/bin/python -m benchmarks.text_encoder_cost --out=/tmp/enc_cost [--steps=60] \
      [--config=configs/shapes.py:cpu] [--config.model.channels=32 ...]

Trains the config (default: the Shapes `cpu` one) for a few steps in each mode and reports the
steady-state steps/s (the first logging interval, which includes compilation, is dropped), as
ratios against the scratch encoder measured in the same run. Configs and `--config.x=v`
overrides are loaded by `configs.loading`, as train.py loads them.
"""

import argparse
import json
import os

from configs import loading
from runtime import workdir as paths
from training import loop

MODES = {
    'scratch': ('--config.text.encoder=scratch', '--config.text.cache_embeddings=False'),
    'pretrained': ('--config.text.encoder=pretrained', '--config.text.cache_embeddings=False'),
    'pretrained_cached': ('--config.text.encoder=pretrained',
                          '--config.text.cache_embeddings=True'),
}


def steady_steps_per_sec(workdir: str) -> float:
  rows = [json.loads(line) for line in open(paths.metrics(workdir))]
  rates = [r['train/steps_per_sec'] for r in rows if 'train/steps_per_sec' in r][1:]
  return sum(rates) / len(rates)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--config', default='configs/shapes.py:cpu')
  args, extra = parser.parse_known_args(argv)  # --config.x=v overrides.
  common = [f'--config.optim.num_steps={args.steps}', '--config.logging.every_steps=10',
            '--config.logging.eval_at_end=False', f'--config.checkpoint.every_steps={args.steps}',
            f'--config.data.data_dir={args.data_dir}', *extra]
  try:  # Every mode's config before any training, so a bad override fails at once.
    mode_configs = {mode: loading.load(args.config, [*common, *overrides])
               for mode, overrides in MODES.items()}
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  results = {}
  for mode, config in mode_configs.items():
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
