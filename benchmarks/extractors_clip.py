"""Images/s of the CLIP image tower (evaluation/clip_model.py), jitted and warm, random weights.

  .venv/bin/python -m benchmarks.extractors_clip [--model=b16] [--batch=32] [--input=224] \
      [--iters=5] [--dtype=float32]

`--model` picks the vision tower's size (b32: ViT-B/32, b16: ViT-B/16, l14: ViT-L/14, l14_336:
ViT-L/14@336, each at its own image size); `--input` is the side of the square images fed in (the
model's own size: no resize, only normalisation; larger: the bicubic resize is included). The
weights are random (made by the module's init, no folder is written): speed does not depend on
them. Prints one JSON line: images/s over `--iters` calls after a compiling call and a warm-up.
"""
import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evaluation import clip_model
from models import layers
from text import clip

MODELS = {  # transformers' vision_config of openai/clip-vit-*, and projection_dim.
    'b32': (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=32), 512),
    'b16': (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, image_size=224, patch_size=16), 512),
    'l14': (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=224, patch_size=14), 768),
    'l14_336': (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=336, patch_size=14), 768),
}


def measure(model: str, batch: int, side: int, iters: int, dtype: str) -> dict:
  vision_cfg, projection_dim = MODELS[model]
  vision = clip_model.CLIPVisionConfig(**vision_cfg)
  text = clip.CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=1, num_attention_heads=2)  # Unused here.
  module = clip_model.CLIPModel(text, vision, projection_dim, layers.DTYPES[dtype])
  s = vision.image_size
  processing = clip_model.ImageProcessing(s, None, (s, s), 'bicubic', clip_model.OPENAI_CLIP_MEAN,
                                          clip_model.OPENAI_CLIP_STD)
  params = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, s, s, 3)),
                                              jnp.zeros((1, 77), jnp.int32))['params'])
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, side, side, 3)),
                       jnp.float32)
  embed = lambda: clip_model.image_embeds(params, images, module=module, processing=processing)
  start = time.perf_counter()
  embed().block_until_ready()
  compile_s = time.perf_counter() - start
  embed().block_until_ready()  # Warm-up.
  start = time.perf_counter()
  for _ in range(iters):
    out = embed()
  out.block_until_ready()
  seconds = time.perf_counter() - start
  return {'model': model, 'batch': batch, 'input': side, 'dtype': dtype,
          'device': str(jax.devices()[0].device_kind), 'cpus': os.cpu_count(),
          'images_per_s': round(batch * iters / seconds, 2),
          'ms_per_batch': round(1000 * seconds / iters, 1), 'first_call_s': round(compile_s, 1)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='b16', choices=sorted(MODELS))
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--input', type=int, default=0, help='image side (0: the model\'s own)')
  parser.add_argument('--iters', type=int, default=5)
  parser.add_argument('--dtype', default='float32', choices=sorted(layers.DTYPES))
  args = parser.parse_args(argv)
  side = args.input or MODELS[args.model][0]['image_size']
  print(json.dumps(measure(args.model, args.batch, side, args.iters, args.dtype)), flush=True)


if __name__ == '__main__':
  main()
