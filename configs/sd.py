"""Fine-tune a pretrained Stable Diffusion (1.x or 2.x, a diffusers folder) on your own captioned
images: `finetune` (accelerators) and `tiny` (a laptop CPU, with a random tiny pipeline); `sample`
is what `sample.py --pretrained` samples a folder with, untrained.

`model.pretrained` fills the U-Net, the CLIP text encoder and tokenizer, the VAE and the noise
schedule and prediction type from the folder (configs/pipeline.py; docs/stable_diffusion.md).

Launch:

  # One GPU node (8 GPUs: the batch splits over them; fsdp shards the 860M-parameter U-Net).
  python train.py --config=configs/sd.py:finetune --workdir=runs/sd15_mine \
      --config.model.pretrained=/models/stable-diffusion-v1-5 --config.data.path=/data/mine \
      --config.mesh.fsdp=8
  # A TPU v5e-16 slice (4 hosts): the same command on every host (launch/tpu.sh starts it).
  python train.py --config=configs/sd.py:finetune --workdir=gs://bucket/runs/sd21 \
      --config.model.pretrained=/models/stable-diffusion-2-1 --config.data.path=/data/mine \
      --config.data.image_size=768 --config.mesh.fsdp=16
  # A laptop CPU, a few minutes: a random tiny pipeline, then fine-tune it on a folder.
  python -m tools.make_sd_pipeline --out=runs/sd_tiny_pipeline
  python train.py --config=configs/sd.py:tiny --workdir=runs/sd_tiny \
      --config.model.pretrained=runs/sd_tiny_pipeline --config.data.path=/data/mine
  # Sample a folder as it is (no training): what diffusers' StableDiffusionPipeline makes.
  python sample.py --pretrained=/models/stable-diffusion-v1-5 --prompt="a photo of a cat" \
      --negative_prompt="blurry" --out=/tmp/cats
"""

from configs import base

VARIANTS = ('finetune', 'tiny', 'sample')


def get_config(arg='finetune'):
  """Returns the Stable Diffusion fine-tuning config for variant `arg` (one of VARIANTS)."""
  arg = arg or 'finetune'
  if arg not in VARIANTS:
    raise ValueError(f'Unknown variant {arg!r} of configs/sd.py; use one of {VARIANTS} '
                     '(e.g. --config=configs/sd.py:finetune).')
  config = base.get_config()
  config.model.family = 'sd'
  config.model.pretrained = ''  # Required: --config.model.pretrained=/models/sd15.
  config.data.dataset = 'folder'
  config.data.path = ''  # Required: --config.data.path=/data/mine (docs/data.md).
  config.data.crop = 'center'
  config.data.flip = True
  config.text.cond_drop_prob = 0.0  # As diffusers' train_text_to_image (SD already knows "").
  config.optim.learning_rate = 1e-5
  config.optim.warmup_steps = 0
  config.optim.end_lr_factor = 1.0  # Constant, as diffusers' default.
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.01
  config.optim.ema_decay = 0.0  # diffusers' --use_ema is off by default; 0.9999 turns ours on.
  config.sampler.name = 'dpmpp_2m'
  config.sampler.num_steps = 25
  config.sampler.guidance_scale = 7.5
  config.sampler.use_ema = False
  config.logging.eval_prompts = 'data'
  config.logging.eval_max_prompts = 8
  config.logging.val_examples = 64  # Validation loss at each evaluation (training/validation.py).

  if arg == 'finetune':
    config.data.image_size = 512
    config.data.global_batch_size = 32
    config.data.num_workers = 8
    config.model.dtype = 'bfloat16'
    config.model.remat = 'dots'
    config.text.dtype = 'bfloat16'
    config.autoencoder.dtype = 'bfloat16'
    config.text.cache_embeddings = True  # The text encoder is frozen: encode each caption once.
    config.optim.num_steps = 15_000
    config.checkpoint.every_steps = 1000
    config.logging.eval_every_steps = 1000
  elif arg == 'tiny':  # CPU, a random tiny pipeline (tools/make_sd_pipeline.py): 16 px, 8 steps.
    config.data.image_size = 16
    config.data.global_batch_size = 4
    config.data.prefetch = 0
    config.optim.num_steps = 8
    config.optim.learning_rate = 1e-4
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    config.logging.every_steps = 1
    config.logging.eval_every_steps = 0
    config.logging.eval_max_prompts = 2
    config.logging.eval_samples_per_prompt = 1
    config.sampler.num_steps = 4
    config.logging.val_examples = 4
  elif arg == 'sample':  # sample.py --pretrained: the folder as it is, in float32 (base.py's
    pass  # dtypes, as diffusers' from_pretrained loads it); the image size is the folder's.
  return config
