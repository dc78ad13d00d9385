"""Samples images from a trained workdir, or from a diffusers Stable Diffusion folder as it is.
Thin entry point: flags -> sampling.from_checkpoint / sampling.from_pipeline.

  python sample.py --workdir=runs/shapes_cpu --prompt="a red circle" --prompt="a blue square" \
      --out=runs/shapes_cpu/samples_cli --sampler=ddim --steps=50 --guidance=3 --seed=0 --num=4
  python sample.py --workdir=runs/shapes_cpu --prompt_file=prompts.txt --out=/tmp/samples
  python sample.py --workdir=runs/shapes_cpu --shapes_benchmark --out=/tmp/bench  # then evaluate.py
  python sample.py --pretrained=/models/sd15 --prompt="a cat" --negative_prompt="blurry" \
      --sampler=euler --steps=30 --guidance=7.5 --out=/tmp/cats  # diffusers' images, untrained

Writes one PNG per sample, grid.png and manifest.jsonl (file, prompt, seed, sampler,
steps, guidance settings, sampler options, grid, checkpoint step). Uses the EMA parameters
unless --noema. A sampler option the sampler does not take (e.g. --eta with heun) is an error.
--pretrained samples the folder with configs/sd.py:sample (float32) on the timesteps of its
scheduler_config.json, as diffusers' StableDiffusionPipeline does (docs/stable_diffusion.md).
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # (TensorFlow only reads TFDS here: no notice.)

from absl import app, flags, logging  # noqa: E402

from diffusion import names  # noqa: E402  (no jax: the flags' choices)

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir (checkpoints + saved config).')
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'Instead of --workdir: a diffusers Stable '
                                  'Diffusion folder, sampled as it is (no training).')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default: WORKDIR/samples_cli; required '
                           'with --pretrained).')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
_NEGATIVE = flags.DEFINE_string('negative_prompt', '', 'What guidance steers away from, for all '
                                'prompts (the unconditional branch encodes it; default: the '
                                'empty caption).')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'A text file with one prompt per line.')
_BENCH = flags.DEFINE_bool('shapes_benchmark', False, 'Use the fixed Shapes benchmark prompt set.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_SAMPLER = flags.DEFINE_enum('sampler', None, list(names.SAMPLER_NAMES),
                             'Sampler (default: the config).')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampler steps (default: the config).')
_GUIDANCE = flags.DEFINE_float('guidance', None, 'CFG scale w (1 = conditional only).')
_ETA = flags.DEFINE_float('eta', None, 'eta of ddim (default: the config\'s sampler.eta) or '
                          'dpmpp_2m_sde (default 1; 0 is dpmpp_2m).')
_GRID = flags.DEFINE_enum('grid', None, list(names.SAMPLING_GRIDS),
                          'Noise-level grid (default: the config).')
_RESCALE = flags.DEFINE_float('guidance_rescale', None,
                               'Guidance rescale phi (Lin et al. 2023; default: the config).')
_INTERVAL = flags.DEFINE_list('guidance_interval', None,
                              'lo,hi: apply w only for log-SNR in [lo, hi] (Kynkaanniemi 2024; '
                              'default: the config).')
_THRESHOLD = flags.DEFINE_float('threshold', None, 'Dynamic thresholding of x0 at this percentile '
                                '(e.g. 99.5; 0 clips to [-1, 1]).')
# Euler/Heun churn (Karras et al. 2022 Alg. 2); s_noise also for dpmpp_2m_sde.
_CHURN = flags.DEFINE_float('s_churn', None, 'S_churn of euler/heun (default 0).')
flags.DEFINE_alias('churn', 's_churn')
_TMIN = flags.DEFINE_float('s_tmin', None,
                           'Churn only where sigma_ve = sigma/alpha >= s_tmin (euler/heun).')
_TMAX = flags.DEFINE_float('s_tmax', None, 'Churn only where sigma_ve <= s_tmax (euler/heun).')
_SNOISE = flags.DEFINE_float('s_noise', None, 'Scale of the added noise (euler/heun/dpmpp_2m_sde).')
_SEED = flags.DEFINE_integer('seed', 0, 'Base seed; sample k of the run gets seed + k.')
_NUM = flags.DEFINE_integer('num', 1, 'Samples per prompt.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per device program.')
_LORA_SCALE = flags.DEFINE_float('lora_scale', 1.0, 'A LoRA run: scale of the adapters\' update '
                                 '(0: the base model alone; as diffusers\' LoRA scale).')
_EMA = flags.DEFINE_bool('ema', True, 'Sample with the EMA parameters (--noema: the raw ones).')
_SIZE = flags.DEFINE_integer('image_size', None, 'Side of the images in pixels (default: the '
                             'trained data.image_size; another needs --allow_other_resolution).')
_HEIGHT = flags.DEFINE_integer('height', None, 'With --width: sample height x width images (a '
                               'trained aspect-ratio bucket, data.buckets; another needs '
                               '--allow_other_resolution; --pretrained: any the network takes).')
_WIDTH = flags.DEFINE_integer('width', None, 'With --height: the width of the images in pixels.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'On an error, print the whole traceback.')
_ALLOW_SIZE = flags.DEFINE_bool('allow_other_resolution', None, 'Allow --image_size to differ from '
                                'the trained size (default: the config\'s '
                                'data.allow_other_sample_size).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  prompts = _check_flags()  # Before anything is loaded.
  from runtime import host
  # Before jax starts: malloc keeps freed memory on a CPU run, and a trained run's images split
  # over one XLA device per core (as many as a program's batch splits over; weights per device).
  host.setup(batch=None if _PRETRAINED.value else min(_BATCH.value, len(prompts) * _NUM.value))
  from runtime import console
  console.quiet_library_noise()
  if not _VERBOSE.value:  # The console: warnings, the progress bar and the summary.
    console.quiet_info()
  from runtime import compile_cache
  compile_cache.enable()  # Before the first jit: a second call loads its programs from disk.
  # Bad flags, prompts or workdir, a damaged checkpoint: one `error:` line (no traceback).
  with compile_cache.CompileCounter() as compiles:
    console.run_or_exit(lambda: _sample(prompts), verbose=_VERBOSE.value)
  logging.info('%s', compiles.summary())  # On the console with --verbose.


def _check_flags() -> list[str]:
  """Flag values that can never work: one `error:` line at once, before anything is loaded.
  Returns the prompts (`_prompts`), read once here."""
  problems = []
  for flag, low in ((_NUM, 1), (_BATCH, 1), (_STEPS, 1), (_SIZE, 1), (_HEIGHT, 1), (_WIDTH, 1)):
    if flag.value is not None and flag.value < low:
      problems.append(f'--{flag.name}={flag.value} must be >= {low}')
  if (_HEIGHT.value is None) != (_WIDTH.value is None):
    problems.append('--height and --width go together (or use --image_size for a square)')
  elif _HEIGHT.value is not None and _SIZE.value is not None:
    problems.append('pass --image_size (a square) or --height and --width, not both')
  if _GUIDANCE.value is not None and _GUIDANCE.value < 0:
    problems.append(f'--guidance={_GUIDANCE.value} must be >= 0 (0: unconditional, 1: '
                    'conditional only, > 1: guided)')
  if _THRESHOLD.value is not None and not 0 <= _THRESHOLD.value <= 100:
    problems.append(f'--threshold={_THRESHOLD.value} must be a percentile in [0, 100]')
  if _INTERVAL.value is not None:
    try:
      lo, hi = (float(v) for v in _INTERVAL.value)
      if lo > hi:
        raise ValueError
    except ValueError:
      problems.append(f'--guidance_interval={",".join(_INTERVAL.value)} must be lo,hi with lo <= '
                      'hi (log-SNR)')
  problems += _source_problems()
  prompts = []
  if _PROMPT_FILE.value and not os.path.isfile(_PROMPT_FILE.value):
    problems.append(f'--prompt_file={_PROMPT_FILE.value}: no such file (one prompt per line)')
  elif not problems and not (prompts := _prompts()):
    problems.append('no prompts: pass --prompt (repeatable), --prompt_file or --shapes_benchmark')
  if problems:
    sys.exit('error: ' + '; '.join(problems) + '.')
  return prompts


def _source_problems() -> list[str]:
  """Exactly one of --workdir / --pretrained, and what each allows."""
  if bool(_WORKDIR.value) == bool(_PRETRAINED.value):
    return ['pass exactly one of --workdir (a training run) and --pretrained (a diffusers Stable '
            'Diffusion folder)']
  if _WORKDIR.value:
    return [] if os.path.isdir(_WORKDIR.value) else [f'--workdir={_WORKDIR.value}: no such folder']
  from configs import pipeline  # (No jax: the folder's layout.)
  workdir_only = ((_STEP, 'a pipeline folder has no checkpoints'),
                  (_EMA, 'a pipeline folder has no EMA parameters'),
                  (_ALLOW_SIZE, 'a pipeline folder samples at any size its network takes'),
                  (_LORA_SCALE, 'a pipeline folder has no LoRA adapters'))
  problems = [f'--{flag.name} needs --workdir ({why})' for flag, why in workdir_only
              if flags.FLAGS[flag.name].present]
  if not _OUT.value:
    problems.append('--pretrained needs --out (the folder to write the images to)')
  folder = os.path.abspath(os.path.expanduser(_PRETRAINED.value))
  if not os.path.isdir(folder):
    problems.append(f'--pretrained={_PRETRAINED.value}: no such folder (a diffusers Stable '
                    f'Diffusion folder: {pipeline.INDEX}, {", ".join(pipeline.COMPONENTS)})')
  else:
    try:
      pipeline.check_folder(folder)
    except pipeline.PipelineError as e:
      problems.append(f'--pretrained={_PRETRAINED.value}: {str(e).rstrip(".")}')
  return problems


def _prompts() -> list[str]:
  """--prompt's, then the Shapes benchmark's, then --prompt_file's lines (no jax)."""
  prompts = list(_PROMPT.value)
  if _BENCH.value:
    from evaluation import shapes_scorer
    prompts += shapes_scorer.benchmark_prompts()
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts += [line.strip() for line in f if line.strip()]
  return prompts


def _size():
  """--image_size (a side), or (--height, --width), or None (the model's own size)."""
  return _SIZE.value if _HEIGHT.value is None else (_HEIGHT.value, _WIDTH.value)


def _load():
  """The model to sample: a workdir's checkpoint, or a pipeline folder (configs/sd.py:sample)."""
  from configs import specs
  from sampling import from_checkpoint
  if _WORKDIR.value:
    return from_checkpoint.load(_WORKDIR.value, _STEP.value, settings_of=specs.from_saved,
                                use_ema=_EMA.value, sampling_grid=_GRID.value,
                                image_size=_size(),
                                allow_other_resolution=_ALLOW_SIZE.value,
                                lora_scale=_LORA_SCALE.value)
  from configs import sd
  from sampling import from_pipeline
  config = sd.get_config('sample')
  config.model.pretrained = _PRETRAINED.value
  return from_pipeline.load(specs.build(config), image_size=_size(), sampling_grid=_GRID.value)


def _sample(prompts: list[str]):
  from diffusion import spec as settings
  from sampling import from_checkpoint
  out = _OUT.value or os.path.join(_WORKDIR.value, 'samples_cli')
  loaded = _load()
  recipe = settings.overridden(
      loaded.settings.sampler, sampler=_SAMPLER.value, num_steps=_STEPS.value,
      guidance_scale=_GUIDANCE.value, guidance_rescale=_RESCALE.value,
      guidance_interval=tuple(float(v) for v in _INTERVAL.value) if _INTERVAL.value else None,
      thresholding=None if _THRESHOLD.value is None else True,
      threshold_percentile=_THRESHOLD.value, use_ema=_EMA.value and not loaded.pretrained,
      options={'eta': _ETA.value, 's_churn': _CHURN.value, 's_tmin': _TMIN.value,
               's_tmax': _TMAX.value, 's_noise': _SNOISE.value})
  summary = from_checkpoint.sample_to_folder(
      loaded, out, prompts, recipe, seed=_SEED.value, samples_per_prompt=_NUM.value,
      batch_size=_BATCH.value, progress=True, negative_prompt=_NEGATIVE.value)
  grids = summary['grids']
  source = (f'of {loaded.pretrained}' if loaded.pretrained
            else f"of checkpoint step {summary['checkpoint_step']}")
  print(f"Wrote {summary['num_images']} images {source} "
        f"in {summary['seconds']:.0f} s (the sampler's trace and compilation: "
        f"{summary['compile_seconds']:.1f} s) to {out}: PNGs, manifest.jsonl, {os.path.basename(grids[0])}"
        + (f' (+{len(grids) - 1} more page{"s" * (len(grids) > 2)})' if len(grids) > 1 else '')
        + '.', file=sys.stderr)
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
