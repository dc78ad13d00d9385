"""Shapes benchmark (32 px), in three sizes: `cpu` (the quickstart), `gpu` and `tiny` (tests), and
`latent`: the quickstart in the latent space of the demo autoencoder.

Launch:

  # Quickstart: a 2-core CPU, about 9 minutes for train, sample and score (BENCHMARKS.md).
  python train.py --config=configs/shapes.py:cpu --workdir=runs/shapes_cpu
  # One accelerator (or a host of 8: the batch is split over all devices).
  python train.py --config=configs/shapes.py:gpu --workdir=runs/shapes_gpu
  # Latent space: the quickstart's U-Net on 16 x 16 x 4 latents of 64 px images, after training
  # the demo autoencoder once (about 4 minutes; docs/latent.md).
  python -m tools.train_autoencoder --out=runs/vae_shapes64 --image_size=64 --steps=600
  python train.py --config=configs/shapes.py:latent --workdir=runs/shapes_latent
  # Smoke test: 16 px, a few steps.
  python train.py --config=configs/shapes.py:tiny --workdir=/tmp/tiny
"""

from configs import base

VARIANTS = ('cpu', 'gpu', 'tiny', 'latent')


def get_config(arg='cpu'):
  """Returns the Shapes config for variant `arg` (one of VARIANTS)."""
  arg = arg or 'cpu'
  if arg not in VARIANTS:
    raise ValueError(f'Unknown variant {arg!r} of configs/shapes.py; use one of {VARIANTS} '
                     '(e.g. --config=configs/shapes.py:cpu).')
  config = base.get_config()
  config.data.dataset = 'shapes'
  config.data.image_size = 32
  config.text.vocab = 'shapes'
  config.text.max_len = 12  # [BOS] + at most 10 words.

  if arg in ('cpu', 'latent'):
    # Tuned for 2 CPU cores (BENCHMARKS.md): 2x2 patches so the U-Net runs at 16x16, two levels,
    # attention at 8x8, a large learning rate and a short EMA.
    config.data.num_train = 20_000
    config.data.global_batch_size = 32
    config.text.width = 64
    config.text.depth = 2
    config.model.patch_size = 2
    config.model.channels = 48
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.norm_groups = 8
    config.optim.num_steps = 2000
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995
    config.checkpoint.every_steps = 500
    config.logging.every_steps = 50
    config.logging.eval_every_steps = 0
    config.sampler.num_steps = 25
    config.sampler.guidance_scale = 2.0
    if arg == 'latent':
      # The same U-Net at the same 16 x 16 working size: 64 px images -> the demo autoencoder's
      # 16 x 16 x 4 latents (encoded in the train step) instead of 32 px images in 2 x 2 patches.
      config.data.dataset = 'shapes_rendered'
      config.data.image_size = 64
      config.autoencoder.path = 'runs/vae_shapes64'
      config.model.patch_size = 1
  elif arg == 'gpu':
    config.data.num_train = 200_000
    config.data.global_batch_size = 256
    config.model.channels = 128
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16, 8)
    config.model.dtype = 'bfloat16'
    config.text.width = 256
    config.text.depth = 4
    config.optim.num_steps = 30_000
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 1000
    config.optim.ema_decay = 0.9995
    config.checkpoint.every_steps = 2000
    config.logging.eval_every_steps = 5000
  elif arg == 'tiny':
    base.shrink_for_tests(config)
    config.data.num_train = 256
    config.data.num_test = 64
  return config


def get_sweep(arg='cpu'):
  """The sweep `python -m launch.sweep --config=configs/shapes.py:cpu --from_config` runs."""
  del arg
  return [{'optim.learning_rate': lr, 'text.cond_drop_prob': p}
          for lr in (1e-3, 2e-3) for p in (0.1, 0.2)]
