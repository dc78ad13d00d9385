"""Shapes accuracy against network evaluations for each sampler, and against guidance scale.

  .venv/bin/python -m benchmarks.samplers --workdir=runs/quickstart --out=runs/quickstart/bench \
      --nfe=5,10,20,50 --extra=ddpm:100,ddpm:250,ddim:100 --samples_per_prompt=4

Samples the fixed benchmark prompt set from a trained workdir's EMA weights (--noema: the raw
ones) with every sampler at (about) each number of network evaluations (Heun's N steps cost
2N-1), scores them with the Shapes scorer, prints a markdown table (full accuracy, its binomial
standard error in brackets) and writes results.json after every row. An --extra cell may set
sampler options: --extra=euler:50:s_churn=20:s_tmin=1,dpmpp_2m_sde:20:eta=0.5.
"""

import argparse
import json
import math
import os
import time

import numpy as np

from configs import specs
from diffusion import samplers, schedules
from diffusion import spec as settings
from evaluation import shapes_scorer as scoring
from sampling import from_checkpoint, images

SAMPLER_ORDER = ('ddpm', 'ddim', 'euler', 'heun', 'dpmpp_2m', 'dpmpp_2m_sde')


def steps_for_nfe(name: str, nfe: int) -> int:
  """The step count whose network-evaluation count is closest to `nfe` (at least 1 step)."""
  return max(1, min(range(1, nfe + 2), key=lambda n: abs(samplers.nfe(name, n) - nfe)))


def parse_cell(cell: str) -> tuple[str, int, dict[str, float]]:
  """'sampler:NFE[:option=value...]' -> (sampler, NFE, options), checked against the sampler."""
  name, nfe, *opts = cell.split(':')
  try:
    options = {k: float(v) for k, v in (o.split('=') for o in opts)}
    nfe = int(nfe)
  except ValueError:
    raise ValueError(f'--extra cell {cell!r}: expected sampler:NFE[:option=value...], e.g. '
                     'euler:50:s_churn=20.') from None
  samplers.sampler_options(name, **options)  # A clear error before hours of sampling.
  return name, nfe, options


def is_deterministic(sampler: str, options: dict) -> bool:
  """Whether `sampler` with `options` solves the probability-flow ODE (injects no noise)."""
  opts = {**samplers.SAMPLER_DEFAULTS[sampler], **options}
  if sampler == 'ddpm':
    return False
  if sampler in ('euler', 'heun'):
    return opts['s_churn'] == 0.0
  return opts.get('eta', 0.0) * opts.get('s_noise', 1.0) == 0.0  # ddim, dpmpp_2m, dpmpp_2m_sde


def label(row) -> str:
  """The table label of a row: its sampler, then any options it set."""
  opts = row.get('options') or {}
  return row['sampler'] + (' (' + ', '.join(f'{k}={v:g}' for k, v in opts.items()) + ')'
                           if opts else '')


def score(loaded, recipe, prompts, per, *, seed=0):
  """Samples `per` images of each prompt with `recipe` and scores them; (summary, s, images)."""
  batch = [p for p in prompts for _ in range(per)]
  t = time.time()
  out = loaded.generator(loaded.unet_params, loaded.text_params, batch, seed=seed,
                         settings=recipe)
  seconds = time.time() - t
  imgs = images.to_uint8(out)
  agg = scoring.aggregate([scoring.score_image(i, p) for i, p in zip(imgs, batch)], batch)
  return agg, seconds, imgs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--nfe', default='5,10,20,50,100')
  parser.add_argument('--extra', default='ddpm:250',
                      help='further sampler:NFE[:option=value...] cells, e.g. '
                           'ddpm:250,ddim:100,euler:50:s_churn=20:s_tmin=1')
  parser.add_argument('--samplers', default=','.join(SAMPLER_ORDER))
  parser.add_argument('--guidance', type=float, default=3.0)
  parser.add_argument('--guidance_sweep', default='1,2,3,4,6',
                      help='w values for --sweep_sampler at --sweep_nfe')
  parser.add_argument('--sweep_sampler', default='dpmpp_2m')
  parser.add_argument('--sweep_nfe', type=int, default=20)
  parser.add_argument('--samples_per_prompt', type=int, default=2)
  parser.add_argument('--grid', default='', help='override diffusion.sampling_grid (e.g. karras)')
  parser.add_argument('--seed', type=int, default=0, help='sample k uses seed + k')
  parser.add_argument('--noema', action='store_true', help='sample with the raw (non-EMA) weights')
  parser.add_argument('--guidance_interval', default='',
                      help='lo,hi: apply w only for log-SNR in [lo, hi], in every cell')
  parser.add_argument('--guidance_rescale', type=float, default=0.0,
                      help='guidance rescale phi (Lin et al. 2023), in every cell')
  parser.add_argument('--threshold', type=float, default=None,
                      help='Imagen dynamic thresholding of x0 at this percentile of |x0|, in every '
                           'cell (0: static clipping to [-1, 1]); default off')
  parser.add_argument('--ode_reference', default='ddim:100',
                      help='sampler:NFE whose images approximate the exact probability-flow ODE '
                           'solution (run it through --extra); each deterministic cell gets its '
                           'mean absolute pixel distance to them (ode_ref_mad, 8-bit levels)')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  interval = tuple(float(v) for v in args.guidance_interval.split(',') if v) or None
  nfes = [int(n) for n in args.nfe.split(',')]
  extra = [parse_cell(e) for e in args.extra.split(',') if e]
  loaded = from_checkpoint.load(args.workdir, settings_of=specs.from_saved,
                                use_ema=not args.noema, sampling_grid=args.grid or None)
  # Every cell starts from the run's configured recipe with these flags applied.
  base = settings.overridden(
      loaded.settings.sampler, guidance_interval=interval,
      guidance_rescale=args.guidance_rescale,
      thresholding=None if args.threshold is None else True,
      threshold_percentile=args.threshold, use_ema=not args.noema)
  gen = loaded.generator
  step = loaded.step
  prompts = scoring.benchmark_prompts()
  per = args.samples_per_prompt
  rows, row_images = [], []

  def save():
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
      json.dump({'workdir': args.workdir, 'checkpoint_step': step, 'ema': not args.noema,
                 'guidance_interval': interval, 'guidance_rescale': args.guidance_rescale,
                 'threshold': args.threshold,
                 'seed': args.seed,
                 'grid': gen.spec.sampling_grid, 'rows': rows}, f, indent=1)

  def run(sampler, nfe, w, options=None):
    options = options or {}
    steps = steps_for_nfe(sampler, nfe)
    if any((r['sampler'], r['steps'], r['w'], r['options']) == (sampler, steps, w, options)
           for r in rows):
      return None
    recipe = settings.overridden(base, sampler=sampler, num_steps=steps, guidance_scale=w,
                                 options=options)
    agg, seconds, imgs = score(loaded, recipe, prompts, per, seed=args.seed)
    full, n = agg['all']['full'], agg['all']['n']
    row = {'sampler': sampler, 'options': options, 'steps': steps,
           'nfe': samplers.nfe(sampler, steps), 'w': w,
           'grid': schedules.effective_grid(gen.spec, sampler),
           'full': full, 'se': math.sqrt(full * (1 - full) / n), 'colour': agg['all']['colour'],
           'shape': agg['all']['shape'], 'count': agg['all']['count'],
           'left_right': agg['all']['left_right'], 'held_out_full': agg['held_out']['full'],
           'n': agg['all']['n'], 'seconds': round(seconds, 1)}
    rows.append(row)
    row_images.append(imgs)
    print(json.dumps(row), flush=True)
    save()

  for sampler in args.samplers.split(','):
    for nfe in nfes + [n for name, n, opts in extra if name == sampler and not opts]:
      run(sampler, nfe, args.guidance)
  for name, nfe, opts in extra:
    run(name, nfe, args.guidance, opts)  # Samplers not in --samplers, and cells with options.
  for w in [float(x) for x in args.guidance_sweep.split(',') if x]:
    run(args.sweep_sampler, args.sweep_nfe, w)
  if args.ode_reference:
    add_ode_distances(rows, row_images, args.ode_reference)
    save()
  print(markdown(rows, nfes + [n for _, n, _ in extra],
                 args.sweep_sampler, args.sweep_nfe))


def add_ode_distances(rows, images, reference: str) -> None:
  """Sets row['ode_ref_mad'] on deterministic rows: mean |image - reference image| (0-255).

  All rows share the seeds, hence the initial noise, so deterministic samplers that solve the
  probability-flow ODE accurately land on the same images as a fine-stepped reference.
  """
  name, _, nfe = reference.partition(':')
  ref = [i for i, r in enumerate(rows) if r['sampler'] == name and not r['options']
         and r['steps'] == steps_for_nfe(name, int(nfe))]
  for i in ref:
    for row, imgs in zip(rows, images):
      if is_deterministic(row['sampler'], row['options']) and row['w'] == rows[i]['w']:
        diff = np.abs(imgs.astype(np.float32) - images[i].astype(np.float32))
        row['ode_ref_mad'] = round(float(diff.mean()), 2)


def markdown(rows, nfes, sweep_sampler='dpmpp_2m', sweep_nfe=20) -> str:
  """Full accuracy (standard error) by sampler x NFE, then by guidance scale."""
  nfes = sorted(set(nfes))
  lines = ['| sampler | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' |',
           '|---|' + '---|' * len(nfes)]
  by = {}
  for r in rows:
    by.setdefault(label(r), {})[(r['nfe'], r['w'])] = r
  w0 = rows[0]['w'] if rows else 3.0

  def table_of(cell, samplers_):
    for sampler in samplers_:
      cells = []
      for n in nfes:
        match = [r for (nfe, w), r in by[sampler].items() if w == w0 and abs(nfe - n) <= 1]
        cells.append(cell(match[0]) if match and cell(match[0]) is not None else '')
      lines.append(f'| {sampler} | ' + ' | '.join(cells) + ' |')

  table_of(lambda r: f"{100 * r['full']:.1f} ({100 * r['se']:.1f})", by)
  with_mad = [s for s in by if any('ode_ref_mad' in r for r in by[s].values())]
  if with_mad:
    lines += ['', '| distance to the ODE reference (mean abs, 0-255) | ' +
              ' | '.join(f'NFE {n}' for n in nfes) + ' |', '|---|' + '---|' * len(nfes)]
    table_of(lambda r: None if 'ode_ref_mad' not in r else f"{r['ode_ref_mad']:.2f}", with_mad)
  lines += ['', f'| w ({sweep_sampler}, {sweep_nfe} NFE) | full | colour | shape | count | '
            'left/right |',
            '|---|---|---|---|---|---|']
  for r in rows:
    if label(r) == sweep_sampler and abs(r['nfe'] - sweep_nfe) <= 1:
      fmt = lambda v: '' if v is None else f'{100 * v:.1f}'
      lines.append(f"| {r['w']} | {fmt(r['full'])} | {fmt(r['colour'])} | {fmt(r['shape'])} | "
                   f"{fmt(r['count'])} | {fmt(r['left_right'])} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
