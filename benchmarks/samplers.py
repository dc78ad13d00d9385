"""Shapes accuracy against network evaluations for each sampler, and against guidance scale.

  .venv/bin/python -m benchmarks.samplers --workdir=runs/quickstart --out=runs/quickstart/bench \
      --nfe=5,10,20,50,100 --ddpm_nfe=250 --samples_per_prompt=2

Samples the fixed benchmark prompt set from a trained workdir's EMA weights with every
sampler at (about) each number of network evaluations (Heun's N steps cost 2N-1), scores
them with the Shapes scorer, prints a markdown table and writes results.json.
"""

import argparse
import json
import os
import time


from data import scoring
from diffusion import samplers
from sampling import from_checkpoint, generate, images

SAMPLER_ORDER = ('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_2m_sde')


def steps_for_nfe(name: str, nfe: int) -> int:
  """The step count whose network-evaluation count is closest to `nfe` (at least 1 step)."""
  return max(1, min(range(1, nfe + 2), key=lambda n: abs(samplers.nfe(name, n) - nfe)))


def score(gen, unet_params, text_params, prompts, per, *, sampler, steps, w, seed=0):
  batch = [p for p in prompts for _ in range(per)]
  t = time.time()
  out = gen(unet_params, text_params, batch, seed=seed, sampler=sampler, num_steps=steps,
            guidance_scale=w)
  seconds = time.time() - t
  imgs = images.to_uint8(out)
  agg = scoring.aggregate([scoring.score_image(i, p) for i, p in zip(imgs, batch)], batch)
  return agg, seconds, imgs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--nfe', default='5,10,20,50,100')
  parser.add_argument('--ddpm_nfe', default='250', help='extra NFE values for ddpm only')
  parser.add_argument('--samplers', default=','.join(SAMPLER_ORDER))
  parser.add_argument('--guidance', type=float, default=3.0)
  parser.add_argument('--guidance_sweep', default='1,2,3,4,6', help='w values (ddim, 20 steps)')
  parser.add_argument('--samples_per_prompt', type=int, default=2)
  parser.add_argument('--grid', default='', help='override diffusion.sampling_grid (e.g. karras)')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  config, unet, text, unet_params, text_params, step, mesh = from_checkpoint.load(args.workdir)
  if args.grid:
    config.diffusion.sampling_grid = args.grid
  gen = generate.Generator(unet, text, config, mesh)
  prompts = scoring.benchmark_prompts()
  per = args.samples_per_prompt
  rows = []

  def run(sampler, nfe, w):
    steps = steps_for_nfe(sampler, nfe)
    if any((r['sampler'], r['steps'], r['w']) == (sampler, steps, w) for r in rows):
      return None
    agg, seconds, imgs = score(gen, unet_params, text_params, prompts, per, sampler=sampler,
                               steps=steps, w=w)
    row = {'sampler': sampler, 'steps': steps, 'nfe': samplers.nfe(sampler, steps), 'w': w,
           'full': agg['all']['full'], 'colour': agg['all']['colour'],
           'shape': agg['all']['shape'], 'count': agg['all']['count'],
           'left_right': agg['all']['left_right'], 'held_out_full': agg['held_out']['full'],
           'n': agg['all']['n'], 'seconds': round(seconds, 1)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
      json.dump({'workdir': args.workdir, 'checkpoint_step': step,
                 'grid': config.diffusion.sampling_grid, 'rows': rows}, f, indent=1)
    return imgs

  nfes = [int(n) for n in args.nfe.split(',')]
  for sampler in args.samplers.split(','):
    extra = [int(n) for n in args.ddpm_nfe.split(',') if n] if sampler == 'ddpm' else []
    for nfe in nfes + extra:
      run(sampler, nfe, args.guidance)
  for w in [float(x) for x in args.guidance_sweep.split(',') if x]:
    run('ddim', 20, w)
  print(markdown(rows, nfes + [int(n) for n in args.ddpm_nfe.split(',') if n]))


def markdown(rows, nfes) -> str:
  """Full accuracy by sampler x NFE, then by guidance scale."""
  nfes = sorted(set(nfes))
  lines = ['| sampler | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
           '|---|' + '---|' * len(nfes)]
  by = {}
  for r in rows:
    by.setdefault(r['sampler'], {})[(r['nfe'], r['w'])] = r
  w0 = rows[0]['w'] if rows else 3.0
  for sampler, table in by.items():
    cells = []
    for n in nfes:
      match = [r for (nfe, w), r in table.items() if w == w0 and abs(nfe - n) <= 1]
      cells.append(f"{100 * match[0]['full']:.1f}" if match else '')
    lines.append(f'| {sampler} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| w (ddim, 20 steps) | full | colour | shape | count | left/right |',
            '|---|---|---|---|---|---|']
  for r in rows:
    if r['sampler'] == 'ddim' and r['nfe'] == 20:
      fmt = lambda v: '' if v is None else f'{100 * v:.1f}'
      lines.append(f"| {r['w']} | {fmt(r['full'])} | {fmt(r['colour'])} | {fmt(r['shape'])} | "
                   f"{fmt(r['count'])} | {fmt(r['left_right'])} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
