"""Your own captioned images (a folder, TFDS or ArrayRecord shards) at 64 px: `cpu`, `gpu`, `tiny`.

Launch (docs/data.md has the three sources and the preparation command):

  # A folder of images with metadata.jsonl (or a .txt caption beside each image).
  python train.py --config=configs/images.py:gpu --workdir=runs/mine \
      --config.data.path=/data/my_images
  # ArrayRecord shards written by python -m tools.prepare (the scalable format, many hosts).
  python train.py --config=configs/images.py:gpu --workdir=runs/mine \
      --config.data.dataset=array_record --config.data.path='/data/shards/train-*.array_record'
  # A TFDS dataset prepared as ArrayRecord.
  python train.py --config=configs/images.py:gpu --workdir=runs/coco \
      --config.data.dataset=tfds --config.data.tfds_name=coco_captions \
      --config.data.caption_key=captions/text --config.data.eval_split=validation
"""

from configs import base

VARIANTS = ('cpu', 'gpu', 'tiny')


def get_config(arg='gpu'):
  """Returns the own-images config for variant `arg` (one of VARIANTS)."""
  arg = arg or 'gpu'
  if arg not in VARIANTS:
    raise ValueError(f'Unknown variant {arg!r} of configs/images.py; use one of {VARIANTS} '
                     '(e.g. --config=configs/images.py:gpu).')
  config = base.get_config()
  config.data.dataset = 'folder'
  config.data.path = ''  # Required: --config.data.path=...
  config.data.image_size = 64
  config.data.crop = 'random'
  config.data.flip = True
  config.text.vocab = 'bpe'  # A subword tokenizer trained on the captions into WORKDIR.
  config.text.max_len = 32
  config.logging.eval_prompts = 'data'  # Captions of the validation split (or the first train ones).
  config.logging.eval_max_prompts = 16
  config.logging.eval_samples_per_prompt = 2
  config.logging.val_examples = 64  # Validation loss at each evaluation (training/validation.py).

  if arg == 'cpu':
    config.data.global_batch_size = 16
    config.data.num_workers = 1
    config.text.width = 64
    config.model.patch_size = 2
    config.model.channels = 48
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.norm_groups = 8
    config.optim.num_steps = 2000
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.ema_decay = 0.995
    config.checkpoint.every_steps = 500
    config.logging.eval_every_steps = 1000
    config.sampler.num_steps = 25
  elif arg == 'gpu':
    config.data.global_batch_size = 128
    config.data.num_workers = 8
    config.model.channels = 128
    config.model.channel_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16, 8)
    config.model.dtype = 'bfloat16'
    config.text.width = 256
    config.text.depth = 4
    config.optim.num_steps = 100_000
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.optim.ema_decay = 0.9999
    config.checkpoint.every_steps = 5000
    config.logging.eval_every_steps = 5000
  elif arg == 'tiny':  # Tests: 16 px, a few steps.
    base.shrink_for_tests(config)
    config.text.vocab_size = 300
    config.text.max_len = 16
    config.logging.eval_samples_per_prompt = 1
    config.logging.val_examples = 0  # (The tests that want it set it.)
  return config
