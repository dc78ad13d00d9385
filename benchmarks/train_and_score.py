"""Train a config (or resume its workdir), then score the Shapes benchmark prompts at several w.

  .venv/bin/python -m benchmarks.train_and_score --config=configs/shapes.py:cpu \
      --workdir=runs/bench_scratch --guidance=1,3,5 --samples_per_prompt=2 \
      [--config.text.encoder=pretrained --config.text.max_len=16 ...]

`--config.field=value` overrides are parsed by `configs.loading`, exactly as train.py parses them.

Prints one JSON line: training seconds, last-50-step loss, and for each w the full/colour/
shape/count/left-right accuracy over the fixed prompt set (held-out pairs on their own).
"""

import argparse
import json
import os
import time

import numpy as np

from configs import loading, specs
from evaluation import shapes_scorer as scoring
from runtime import state
from sampling import generate, images
from training import loop


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/shapes.py:cpu')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--guidance', default='1,3,5')
  parser.add_argument('--samples_per_prompt', type=int, default=2)
  args, overrides = parser.parse_known_args(argv)  # --config.x=v overrides.
  try:
    config = loading.load(args.config, overrides)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  config.logging.eval_at_end = False
  t0 = time.time()
  result = loop.train_and_evaluate(config, args.workdir)
  train_s = time.time() - t0
  settings = specs.build(config)
  autoencoder = state.build_autoencoder(settings.autoencoder)
  unet, text = state.build_networks(settings, autoencoder=autoencoder, workdir=args.workdir)
  gen = generate.Generator(unet, text, settings.diffusion, settings.data.image_size,
                           autoencoder=autoencoder, decode_chunk=settings.autoencoder.decode_chunk)
  recipe = settings.sampler
  ema = result.state.ema_params
  text_params = ema['text'] if text.trainable else text.init(None)
  prompts = scoring.benchmark_prompts()
  batch = [p for p in prompts for _ in range(args.samples_per_prompt)]
  losses = [loss for _, loss in result.history[-50:]]
  out = {'config': args.config, 'overrides': overrides, 'steps': int(result.state.step),
         'train_seconds': round(train_s), 'loss_last50': float(np.mean(losses)) if losses else None}
  for w in [float(x) for x in args.guidance.split(',')]:
    t = time.time()
    x = gen(ema['unet'], text_params, batch, seed=0, settings=recipe.replace(guidance_scale=w))
    imgs = images.to_uint8(x)
    agg = scoring.aggregate([scoring.score_image(i, p) for i, p in zip(imgs, batch)], batch)
    out[f'w={w}'] = {'all': agg['all'], 'held_out': agg['held_out'],
                     'sample_seconds': round(time.time() - t)}
    images.save_pages(images.captioned_pages(imgs, prompts, args.samples_per_prompt),
                      args.workdir, f'bench_grid_w{w}')  # bench_grid_w{w}.png, ..._2.png, ...
  print('RESULT', json.dumps(out), flush=True)
  with open(os.path.join(args.workdir, 'bench.json'), 'w') as f:
    json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
