"""The Stable Diffusion-sized VAE: decoder memory with and without chunking, encode/decode speed.

  # Decoder memory from XLA's compiled memory analysis (no weights needed; any device):
  PYTHONPATH=. .venv/bin/python -m benchmarks.vae memory --sizes=256,512 --batch=8 --chunks=0,1,4
  # Encode and decode images/s and peak device memory on the device present (an accelerator:
  # the figure BENCHMARKS.md asks for at 512 px, bfloat16):
  PYTHONPATH=. .venv/bin/python -m benchmarks.vae speed --size=512 --batch=16 --dtype=bfloat16 \
      [--vae=/data/sd-vae-ft-mse]
  # A folder with the SD VAE's architecture and random weights (for benchmarks.latents):
  PYTHONPATH=. .venv/bin/python -m benchmarks.vae write --out=/tmp/sd_vae_random
  # What an autoencoder loses on Shapes: the scorer on test images and on their reconstructions
  # (the ceiling of a latent Shapes run, e.g. configs/shapes.py:latent):
  PYTHONPATH=. .venv/bin/python -m benchmarks.vae shapes --vae=runs/vae_shapes64 --size=64 --num=252

Without `--vae` the network is the SD 1.x/2.x VAE (channels 128/256/512/512, 2 ResNets per level,
4 latent channels, 83.7M parameters) with random weights: speed and memory do not depend on the
values. `--chunks`: 0 decodes the whole batch in one call; k decodes k latents at a time
(`PretrainedVAE.decode_chunked`, as sampling does with autoencoder.decode_chunk).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import vae_loading
from models.autoencoder import AutoencoderKL, VAEConfig

SD_VAE = VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
                   source='benchmarks/vae.py (the SD 1.x VAE architecture)')


def build(path: str, dtype: str, weights: bool = True) -> vae_loading.PretrainedVAE:
  """The VAE at `path`, or the SD architecture with random weights (abstract if not `weights`)."""
  if path:
    return vae_loading.load_vae(path, dtype)
  from models import layers  # pylint: disable=g-import-not-at-top
  module = AutoencoderKL(SD_VAE, dtype=layers.resolve_dtype(dtype, '--dtype'))
  init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  params = jax.jit(init)() if weights else jax.eval_shape(init)
  return vae_loading.PretrainedVAE(path='random SD-sized VAE', config=SD_VAE, module=module,
                                   params=params, fingerprint='random')


def decoder(vae, chunk: int):
  if chunk:
    return jax.jit(lambda p, z: vae.decode_chunked(p, z, chunk))
  return jax.jit(vae.decode)


def memory(args) -> list[dict]:
  vae = build(args.vae, args.dtype, weights=False)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vae.params)
  f, c = vae.config.downsample_factor, vae.config.latent_channels
  rows = []
  for size in [int(s) for s in args.sizes.split(',')]:
    for chunk in [int(k) for k in args.chunks.split(',')]:
      z = jax.ShapeDtypeStruct((args.batch, size // f, size // f, c), jnp.float32)
      t = time.perf_counter()
      stats = decoder(vae, chunk).lower(params, z).compile().memory_analysis()
      row = {'size': size, 'batch': args.batch, 'chunk': chunk or args.batch,
             'temp_gib': stats.temp_size_in_bytes / 2**30,
             'weights_gib': stats.argument_size_in_bytes / 2**30,
             'output_gib': stats.output_size_in_bytes / 2**30,
             'compile_s': time.perf_counter() - t}
      rows.append(row)
      print(f"{size} px, batch {args.batch}, {row['chunk']} per decoder call: temporaries "
            f"{row['temp_gib']:.2f} GiB (arguments {row['weights_gib']:.2f} GiB, output "
            f"{row['output_gib']:.2f} GiB)", flush=True)
  return rows


def speed(args) -> dict:
  vae = build(args.vae, args.dtype)
  f, c = vae.config.downsample_factor, vae.config.latent_channels
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)), jnp.float32)
  latents = jnp.asarray(rng.normal(size=(args.batch, args.size // f, args.size // f, c)),
                        jnp.float32)
  runs = {'encode': (jax.jit(vae.encode), images), 'decode': (decoder(vae, args.chunk), latents)}
  out = {'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}', 'size': args.size,
         'batch': args.batch, 'dtype': args.dtype, 'chunk': args.chunk, 'vae': vae.path}
  rates = {name: [] for name in runs}
  for name, (fn, x) in runs.items():
    t = time.perf_counter()
    jax.block_until_ready(fn(vae.params, x))
    out[f'{name}_compile_s'] = time.perf_counter() - t
  for _ in range(args.rounds):  # Encode and decode in turn.
    for name, (fn, x) in runs.items():
      t = time.perf_counter()
      for _ in range(args.steps):
        y = fn(vae.params, x)
      jax.block_until_ready(y)
      rates[name].append(args.steps * args.batch / (time.perf_counter() - t))
  for name in runs:
    out[f'{name}_img_per_s'] = statistics.median(rates[name])
  stats = jax.devices()[0].memory_stats() or {}
  out['peak_gib'] = stats.get('peak_bytes_in_use', float('nan')) / 2**30
  print(f"{out['device']}, {args.size} px, batch {args.batch}, {args.dtype}: encode "
        f"{out['encode_img_per_s']:.1f} img/s, decode {out['decode_img_per_s']:.1f} img/s, peak "
        f"device memory {out['peak_gib']:.2f} GiB (nan: not reported by this device)", flush=True)
  return out


def shapes(args) -> dict:
  from data import shapes as shapes_data  # pylint: disable=g-import-not-at-top
  from evaluation import shapes_scorer as scoring  # pylint: disable=g-import-not-at-top
  from sampling import images as images_lib  # pylint: disable=g-import-not-at-top
  vae = build(args.vae, args.dtype)
  examples = [shapes_data.example('test', i, args.size) for i in range(args.num)]
  originals = np.stack([img for img, _ in examples])
  captions = [c for _, c in examples]
  encode, decode = jax.jit(vae.encode), jax.jit(vae.decode)
  recon = []
  for i in range(0, args.num, args.batch):
    x = jnp.asarray(originals[i:i + args.batch], jnp.float32) / 127.5 - 1.0
    recon.append(images_lib.to_uint8(decode(vae.params, encode(vae.params, x).mean)))
  recon = np.concatenate(recon)
  out = {'vae': vae.path, 'size': args.size, 'n': args.num}
  for name, imgs in (('originals', originals), ('reconstructions', recon)):
    agg = scoring.aggregate([scoring.score_image(im, c) for im, c in zip(imgs, captions)], captions)
    out[name] = agg['all']
    print(f"{name:16s} " + ', '.join(f'{k} {100 * v:.1f}%' for k, v in agg['all'].items()
                                      if not k.startswith('n') and v is not None), flush=True)
  return out


def write(args) -> dict:
  vae = build('', 'float32')
  folder = vae_loading.save_vae(args.out, SD_VAE, vae.params)
  print(f'wrote {folder}', flush=True)
  return {'out': folder}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('mode', choices=('memory', 'speed', 'write', 'shapes'))
  parser.add_argument('--vae', default='', help='A diffusers AutoencoderKL folder ("" = SD-sized).')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--sizes', default='256,512')
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--chunks', default='0,1,4')
  parser.add_argument('--chunk', type=int, default=0)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='/tmp/sd_vae_random')
  parser.add_argument('--num', type=int, default=252)
  parser.add_argument('--json_out', default='')
  args = parser.parse_args(argv)
  result = {'memory': memory, 'speed': speed, 'write': write, 'shapes': shapes}[args.mode](args)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
