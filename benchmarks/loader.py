"""Data-loader throughput: our grain loader beside a plain PyTorch DataLoader, and the scale it serves.

  # Loaders side by side (2,000 JPEGs of ~512x384, made once in --data_dir; ~5 minutes on 2 cores):
  .venv/bin/python -m benchmarks.loader --json_out=/tmp/loader.json
  # The CPU quickstart's loader alone (batches/s against the quickstart's train steps/s):
  .venv/bin/python -m benchmarks.loader --mode=quickstart
  # The train step's own images/s on whatever device is present (--config.x=v overrides apply;
  # on the 24 GiB CPU machine the gpu config's batch of 256 runs out of memory: pass a smaller one):
  .venv/bin/python -m benchmarks.loader --mode=train_step --train_config=configs/shapes.py:gpu

`loaders`: for each image size and worker count, our loader (`data.pipeline`, FolderSource, centre
crop) and the peer (`torch.utils.data.DataLoader` over `PeerDataset`: the same file read, Pillow
decode, `resize` call, crop and float conversion, default collate) are timed in turn, A B A B,
`--repeats` times. Each timing starts the iterator, takes one batch (start-up: worker processes
and the first batch, reported apart) and then times `--batches` batches. Reported: medians of
images/s and the median of the paired ratios ours/peer. At 0 workers ours still prepares
`--prefetch` batches on threads, as training does; the DataLoader loads in the main thread, and
its collate runs on torch's intra-op threads (--peer_threads sets how many). PyTorch is an
optional peer, never a dependency of the project: without it the peer column is empty. Modes
combine: --mode=a,b.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MODES = ('loaders', 'quickstart', 'train_step')
QUICKSTART_STEPS_PER_S = 4.2  # configs/shapes.py:cpu training on this 2-core machine.


# ----------------------------------------------------------------------------- data


def synthetic_jpeg(i: int) -> bytes:
  """A natural-looking ~480-544 x 360-408 JPEG (every 5th portrait) of ~40-50 KB, from seed i."""
  rng = np.random.default_rng(i)
  w, h = int(rng.integers(480, 545)), int(rng.integers(360, 409))
  if i % 5 == 0:
    w, h = h, w
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  t = ((x * np.cos(angle) + y * np.sin(angle)) / np.hypot(w, h) + 0.5)[..., None]
  pixels = rng.uniform(0, 255, 3) * (1 - t) + rng.uniform(0, 255, 3) * t  # A smooth gradient,
  blobs = rng.normal(0, 40, (h // 16 + 1, w // 16 + 1, 3)) + 128  # low-frequency blotches,
  pixels += np.asarray(Image.fromarray(blobs.clip(0, 255).astype(np.uint8)).resize(
      (w, h), Image.Resampling.BICUBIC), np.float32) - 128
  img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(int(rng.integers(3, 9))):  # shapes with soft edges,
    cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 120))
    shape = draw.ellipse if rng.integers(2) else draw.rectangle
    shape((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  img = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), np.float32)
  img = Image.fromarray((img + rng.normal(0, 5, img.shape)).clip(0, 255).astype(np.uint8))  # grain.
  buf = io.BytesIO()
  img.save(buf, format='JPEG', quality=90)
  return buf.getvalue()


def make_folder(data_dir: str, num_images: int) -> str:
  """`num_images` JPEGs + metadata.jsonl in `data_dir` (kept and reused when already complete)."""
  marker = os.path.join(data_dir, 'done.json')
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f).get('num_images') == num_images:
        return data_dir
  os.makedirs(data_dir, exist_ok=True)
  for name in os.listdir(data_dir):  # An older or partial set: start again.
    if name.endswith('.jpg') or name in ('metadata.jsonl', 'done.json'):
      os.remove(os.path.join(data_dir, name))
  start, sizes = time.perf_counter(), []
  with open(os.path.join(data_dir, 'metadata.jsonl'), 'w') as meta:
    for i in range(num_images):
      data = synthetic_jpeg(i)
      sizes.append(len(data))
      with open(os.path.join(data_dir, f'{i:05d}.jpg'), 'wb') as f:
        f.write(data)
      meta.write(json.dumps({'file_name': f'{i:05d}.jpg', 'text': f'picture number {i}'}) + '\n')
  with open(marker, 'w') as f:
    json.dump({'num_images': num_images, 'mean_kb': float(np.mean(sizes)) / 1e3}, f)
  print(f'Wrote {num_images} JPEGs (mean {np.mean(sizes) / 1e3:.1f} KB) to {data_dir} in '
        f'{time.perf_counter() - start:.0f} s.', flush=True)
  return data_dir


# ----------------------------------------------------------------------------- the peer


class PeerDataset:
  """Map-style dataset doing the work of `data.images` by hand with Pillow, as a PyTorch user would.

  The same ops as our loader's centre-crop path: read the bytes, decode, RGB, shorter side to
  `size` with BICUBIC (reducing_gap=3.0 when shrinking), centre crop, uint8 -> float32 in [-1, 1].
  A plain sequence, so `torch.utils.data.DataLoader` takes it without importing torch here.
  """

  def __init__(self, folder: str, size: int):
    self.size = size
    with open(os.path.join(folder, 'metadata.jsonl')) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    self.items = [(os.path.join(folder, r['file_name']), r['text']) for r in rows]

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int):
    path, caption = self.items[index]
    with open(path, 'rb') as f:
      img = Image.open(io.BytesIO(f.read()))
      img.load()
    if img.mode != 'RGB':
      img = img.convert('RGB')
    s, (w, h) = self.size, img.size
    if min(w, h) != s:
      scale = s / min(w, h)
      img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))),
                       Image.Resampling.BICUBIC, reducing_gap=None if scale > 1 else 3.0)
    x, y = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((x, y, x + s, y + s))
    return np.asarray(img, np.uint8).astype(np.float32) / 127.5 - 1.0, caption


# ----------------------------------------------------------------------------- timing


def time_iterator(start, batches: int, batch_size: int) -> dict:
  """Start-up (iterator + first batch) and images/s over the next `batches` batches."""
  t0 = time.perf_counter()
  it, close = start()
  next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    next(it)
  t2 = time.perf_counter()
  close()
  return {'startup_s': t1 - t0, 'img_per_s': batches * batch_size / (t2 - t1)}


def ours(folder: str, size: int, workers: int, args, repeat: int):
  from configs import base, specs  # pylint: disable=import-outside-toplevel
  from data import pipeline, sources  # pylint: disable=import-outside-toplevel
  data = specs.build(base.get_config()).data.replace(
      image_size=size, crop='center', flip=False, upscale=True, on_bad_record='skip', seed=repeat,
      global_batch_size=args.batch_size)
  loader = pipeline.make_loader(data, sources.FolderSource(folder, caption_key='text'))

  def start():
    it = pipeline.iterate(loader, start_step=0, num_steps=args.batches + 1,
                          prefetch=args.prefetch, num_workers=workers)
    return it, it.close
  return time_iterator(start, args.batches, args.batch_size)


def peer(folder: str, size: int, workers: int, args, repeat: int):
  import torch  # pylint: disable=import-outside-toplevel
  from torch.utils.data import DataLoader  # pylint: disable=import-outside-toplevel
  if args.peer_threads:  # torch's intra-op threads (collate's stack); its workers use 1 each.
    torch.set_num_threads(args.peer_threads)
  loader = DataLoader(PeerDataset(folder, size), batch_size=args.batch_size, shuffle=True,
                      num_workers=workers, drop_last=True,
                      generator=torch.Generator().manual_seed(repeat),
                      prefetch_factor=max(args.prefetch, 1) if workers else None)

  def start():
    it = iter(loader)
    return it, getattr(it, '_shutdown_workers', lambda: None)
  return time_iterator(start, args.batches, args.batch_size)


def run_loaders(args) -> list[dict]:
  if (args.batches + 1) * args.batch_size > args.num_images:
    raise SystemExit(f'--batches + 1 = {args.batches + 1} batches of {args.batch_size} need more '
                     f'than --num_images={args.num_images} images.')
  folder = make_folder(args.data_dir, args.num_images)
  with_peer = importlib.util.find_spec('torch') is not None
  if not with_peer:
    print('PyTorch is not installed: the peer is skipped (pip install torch to compare).')
  print('| size | workers | ours img/s | peer img/s | ours/peer | ours start-up s | '
        'peer start-up s |\n|---|---|---|---|---|---|---|', flush=True)
  rows = []
  for size in args.sizes:
    for workers in args.workers:
      runs = {'ours': [], 'peer': []}
      for r in range(args.repeats):  # Interleaved, so both see the same load on the machine.
        runs['ours'].append(ours(folder, size, workers, args, r))
        if with_peer:
          runs['peer'].append(peer(folder, size, workers, args, r))
      row = {'size': size, 'workers': workers}
      for name, timings in runs.items():
        rates = [t['img_per_s'] for t in timings]
        row[name] = rates or None
        row[f'{name}_img_per_s'] = statistics.median(rates) if rates else None
        row[f'{name}_startup_s'] = (statistics.median(t['startup_s'] for t in timings)
                                    if timings else None)
      row['ratio'] = statistics.median(
          o / p for o, p in zip(row['ours'], row['peer'])) if with_peer else None
      rows.append(row)
      print(format_row(row), flush=True)
  return rows


def format_row(row: dict) -> str:
  fmt = lambda v, spec: '-' if v is None else format(v, spec)
  return (f"| {row['size']} | {row['workers']} | {fmt(row['ours_img_per_s'], '.0f')} | "
          f"{fmt(row['peer_img_per_s'], '.0f')} | {fmt(row['ratio'], '.2f')} | "
          f"{fmt(row['ours_startup_s'], '.2f')} | {fmt(row['peer_startup_s'], '.2f')} |")


# ----------------------------------------------------------------------------- the scale


def run_quickstart(args) -> dict:
  """Our loader alone on the quickstart config: batches/s against the quickstart's steps/s."""
  from configs import loading  # pylint: disable=import-outside-toplevel
  from data import pipeline, sources  # pylint: disable=import-outside-toplevel
  config = loading.load(args.quickstart_config,
                        [f'--config.data.dataset={args.quickstart_dataset}'])
  loader = pipeline.make_loader(config.data, sources.make(config.data, 'train'))

  def start():
    it = pipeline.iterate(loader, start_step=0, num_steps=args.batches + 1,
                          prefetch=config.data.prefetch, num_workers=config.data.num_workers)
    return it, it.close
  t = time_iterator(start, args.batches, config.data.global_batch_size)
  d = config.data
  out = {'config': args.quickstart_config, 'dataset': d.dataset, 'batch_size': d.global_batch_size,
         'num_workers': d.num_workers, 'prefetch': d.prefetch, **t,
         'batches_per_s': t['img_per_s'] / d.global_batch_size,
         'train_steps_per_s': args.quickstart_steps_per_s}
  out['headroom'] = out['batches_per_s'] / args.quickstart_steps_per_s
  print(f"Quickstart loader ({out['config']}, {out['dataset']}, batch {out['batch_size']}, "
        f"{out['num_workers']} workers, prefetch {out['prefetch']}): {out['batches_per_s']:.1f} "
        f"batches/s = {out['headroom']:.1f}x the training's {args.quickstart_steps_per_s} steps/s.")
  return out


def run_train_step(args, overrides) -> dict:
  """The jitted train step of `--train_config` on random images: images/s on this device."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from configs import loading, validation  # pylint: disable=import-outside-toplevel
  from data import shapes  # pylint: disable=import-outside-toplevel
  from runtime import sharding  # pylint: disable=import-outside-toplevel
  from text import subword  # pylint: disable=import-outside-toplevel
  from training import builder  # pylint: disable=import-outside-toplevel
  settings = validation.validate(loading.load(args.train_config, overrides))
  mesh = sharding.make_mesh(settings.mesh)
  b, s = settings.data.global_batch_size, settings.data.image_size
  captions = [shapes.example('train', i, 32)[1] for i in range(b)]
  tokenizer_dir = tempfile.mkdtemp(prefix='jaxdiff-bench-')  # text.vocab='bpe': train it here.
  subword.ensure_trained(settings.text, tokenizer_dir, lambda: captions * 20)
  trainer = builder.build_trainer(settings, mesh, workdir=tokenizer_dir)
  local = {'image': np.random.default_rng(0).uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
           'bad': np.zeros(b, np.int32), **trainer.text_inputs({'caption': captions})}
  rng = jax.random.PRNGKey(0)
  args_of = lambda: (rng, trainer.frozen_weights, trainer.vae_params)
  with jax.set_mesh(mesh), nn.logical_axis_rules(settings.mesh.logical_axis_rules):
    state, batch = trainer.init(rng), sharding.global_batch(mesh, local)
    t0 = time.perf_counter()
    state, m = trainer.step(state, batch, *args_of())  # Compilation and the first step.
    jax.block_until_ready(m)
    t1 = time.perf_counter()
    for _ in range(args.train_steps):
      state, m = trainer.step(state, batch, *args_of())
    jax.block_until_ready((state, m))
    t2 = time.perf_counter()
  device = jax.devices()[0]
  out = {'config': args.train_config, 'overrides': list(overrides), 'batch_size': b,
         'image_size': s, 'device': f'{jax.device_count()} x {device.device_kind}',
         'platform': device.platform, 'compile_and_first_step_s': t1 - t0,
         'steps_per_s': args.train_steps / (t2 - t1), 'loss': float(m['loss'])}
  out['img_per_s'] = out['steps_per_s'] * b
  print(f"Train step of {args.train_config} (batch {b}, {s} px) on {out['device']}: "
        f"{out['steps_per_s']:.3g} steps/s = {out['img_per_s']:.3g} images/s "
        f"(compile + first step {out['compile_and_first_step_s']:.0f} s).")
  return out


# ----------------------------------------------------------------------------- main


def main(argv=None):
  ints = lambda s: [int(v) for v in s.split(',') if v]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mode', default='loaders', help=f'Comma-separated, of {MODES}.')
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(),
                                                         'jaxdiff_loader_bench'))
  parser.add_argument('--num_images', type=int, default=2000)
  parser.add_argument('--sizes', type=ints, default=[256, 64])
  parser.add_argument('--workers', type=ints, default=[0, 1, 2])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--batches', type=int, default=60, help='Timed batches after the first.')
  parser.add_argument('--prefetch', type=int, default=2,
                      help='Ours: data.prefetch (threads at 0 workers, buffer per worker); the '
                      'peer: prefetch_factor with workers.')
  parser.add_argument('--peer_threads', type=int, default=0,
                      help="The peer's torch.set_num_threads (0: torch's default, one per core).")
  parser.add_argument('--quickstart_config', default='configs/shapes.py:cpu')
  parser.add_argument('--quickstart_dataset', default='shapes_rendered')
  parser.add_argument('--quickstart_steps_per_s', type=float, default=QUICKSTART_STEPS_PER_S)
  parser.add_argument('--train_config', default='configs/shapes.py:gpu')
  parser.add_argument('--train_steps', type=int, default=5, help='Timed steps after the first.')
  parser.add_argument('--json_out', default='')
  args, overrides = parser.parse_known_args(argv)  # --config.x=v: the train step's overrides.
  modes = [m for m in args.mode.split(',') if m]
  if bad := [m for m in modes if m not in MODES] + [o for o in overrides
                                                    if not o.startswith('--config.')]:
    parser.error(f'Unknown mode or flag {bad}; modes are {MODES}.')
  results = {'args': vars(args), 'torch': None}
  if importlib.util.find_spec('torch') is not None and 'loaders' in modes:
    import torch  # pylint: disable=import-outside-toplevel
    results['torch'] = torch.__version__
  if 'loaders' in modes:
    results['loaders'] = run_loaders(args)
  if 'quickstart' in modes:
    results['quickstart'] = run_quickstart(args)
  if 'train_step' in modes:
    results['train_step'] = run_train_step(args, overrides)
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':  # Grain's worker processes are spawned: they import this module.
  main()
