"""Converts a dataset into ArrayRecord shards of jaxdiff records (`data.records`): `python -m tools.prepare`.

  python -m tools.prepare --source=folder --input=/data/my_images --output=/data/shards/train \\
      --num_shards=16 --workers=4 [--max_side=512] [--format=keep] [--limit=100]
  python -m tools.prepare --source=tfds --tfds_name=coco_captions --split=train --data_dir=/data/tfds \\
      --image_key=image --caption_key=captions/text --output=/data/shards/coco
  python -m tools.prepare --source=webdataset --input='/data/wds/{00000..00099}.tar' --output=...
  ... --text_encoder=pretrained [--pretrained_path=DIR] [--max_len=16]   # also store embeddings
  ... --autoencoder=VAE_DIR --image_size=256    # also store latents' posterior moments (docs/latent.md)
  ... --buckets='((64,64),(48,80),(80,48))'     # each record's aspect-ratio bucket (docs/data.md),
  ... --image_size=64 --bucket_max_aspect=2 --bucket_step=8   # or the buckets the config generates

then train with data.dataset='array_record', data.path='/data/shards/train-*.array_record'.

Output: `{output}-{k:05d}-of-{N:05d}.array_record` for k < N, a sidecar `<shard>.json` per shard
(its counts, the settings it was written with, the buckets among them, and every record's image
size, which bucketed training reads instead of the records) and `{output}.summary.json`: records
written and skipped, the skip reasons with up to 20 example keys each, per-shard counts. With
buckets, each record stores its bucket, and --autoencoder encodes it at that bucket's size.

Order: shard k holds the source's examples [k*n/N, (k+1)*n/N) in source order (n = examples, or
--limit), the unusable ones left out. Read in sorted file-name order (as the array_record source
does), the records are the source's examples in its order, so when nothing is skipped record i is
source example i (folder: the i-th image in sorted path order) and, without --max_side and with
--format=keep, training on the shards gives the same batches as training on the source. Webdataset
tars are split the same way by whole tars: shard k reads tars [k*T/N, (k+1)*T/N) in sorted order.

Each example is decoded to check it (as the loader will); one that cannot be used (unreadable, not
an image, no caption) is counted and skipped (--on_bad_record=error: the first is fatal). An image
whose longer side is above --max_side is shrunk to it (Lanczos, aspect kept; never enlarged) and
re-encoded as --format (JPEG for keep). Otherwise a JPEG/PNG/WebP file keeps its bytes if it is in
--format already (keep: always); the rest, and TFDS arrays, are encoded as --format (PNG for keep).

Workers (spawned processes) write whole shards, each to `<shard>.tmp` renamed when complete, so a
rerun after an interruption keeps the finished shards and writes the rest. It refuses shards of
another --num_shards, or written with other settings or from other input (their sidecars tell).
"""
from __future__ import annotations

from concurrent import futures
import dataclasses
import glob as globlib
import json
import multiprocessing
import os
import queue as queuelib
import sys
from typing import Any, Iterator, Sequence

from absl import app, flags, logging

from data import latents, records, sources, webdataset
from text import record_text
from tools.convert import (FORMATS, Options, bucket_option, convert, flag_named, skip_reason,
                           text_config)

SOURCES = ('folder', 'tfds', 'webdataset')
EXAMPLE_KEYS = 20  # Example keys kept per skip reason in the summaries.


def shard_path(output: str, index: int, num_shards: int) -> str:
  """`{output}-{index:05d}-of-{num_shards:05d}.array_record`."""
  return f'{output}-{index:05d}-of-{num_shards:05d}.array_record'


def open_source(kind: str, *, path: str = '', caption_key: str = 'text', tfds_name: str = '',
                split: str = 'train', data_dir: str = '', image_key: str = 'image'):
  """The source to convert: a FolderSource, TfdsSource or webdataset.TarSource (errors name flags)."""
  if kind not in SOURCES:
    raise ValueError(f'--source={kind!r} is not one of {SOURCES}.')
  try:
    if kind == 'folder':
      if not path:
        raise ValueError('--input is empty: set it to the folder of images (--input=/data/my_images).')
      if not os.path.isdir(path):
        raise FileNotFoundError(f'--input={path!r}: no such directory.')
      return sources.FolderSource(path, caption_key)
    if kind == 'webdataset':
      return webdataset.TarSource(path, caption_key)
    return sources.TfdsSource(tfds_name, split, data_dir, image_key, caption_key)
  except (ValueError, FileNotFoundError) as e:
    raise flag_named(e) from None


def _describe(source) -> str:
  """The input as the settings record it: the folder, tar pattern or TFDS name/split."""
  if isinstance(source, sources.TfdsSource):
    return f'tfds:{source.name}/{source.split}'
  return getattr(source, 'root', None) or getattr(source, 'pattern', None) or type(source).__name__


# ------------------------------------------------------------------------------- one shard


@dataclasses.dataclass(frozen=True)
class _Job:
  index: int
  path: str
  contents: dict  # {'start', 'stop'} (source indices) or {'tars': [[tar, cap or None], ...]}


_STATE: dict[str, Any] = {}  # Per process: source, options, settings, progress report, embedder.


def _init_worker(source, opts: Options, settings: dict, report) -> None:
  """Sets this process's state; `report(n)` counts n examples done on the progress bar."""
  _STATE.clear()
  _STATE.update(source=source, opts=opts, settings=settings, report=report, embedder=None,
                latents=None)


def _raw_examples(job: _Job) -> Iterator[dict[str, Any]]:
  source = _STATE['source']
  if 'tars' in job.contents:
    for tar, cap in job.contents['tars']:
      yield from source.examples(tar, cap)
    return
  for i in range(job.contents['start'], job.contents['stop']):
    try:
      yield source[i]
    except OSError as e:
      files = getattr(source, 'files', None)
      key = os.path.join(source.root, files[i]) if files is not None else f'example {i}'
      yield {'key': key, 'error': f'unreadable file ({e})'}


def _write_json(path: str, value: Any) -> None:
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


def _write_shard(job: _Job) -> dict[str, Any]:
  """Writes one shard (to .tmp, renamed when complete) and its sidecar; returns the sidecar."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  opts, report = _STATE['opts'], _STATE['report']
  if opts.text and _STATE['embedder'] is None:
    _STATE['embedder'] = record_text.Embedder(opts.text)
  if opts.latent and _STATE['latents'] is None:
    _STATE['latents'] = latents.LatentEncoder(**opts.latent, buckets=opts.buckets or ())
  side = {'file': os.path.basename(job.path), 'written': 0, 'skipped': 0, 'reasons': {},
          'contents': job.contents, 'settings': _STATE['settings']}
  pending, unreported, sizes = [], 0, []

  def flush():
    if pending and _STATE['embedder'] is not None:
      for record, text in zip(pending, _STATE['embedder']([r['captions'] for r in pending])):
        record['text'] = text
    if pending and _STATE['latents'] is not None:
      encoded = _STATE['latents']([r['image'] for r in pending], [r.get('bucket') for r in pending])
      for record, latent in zip(pending, encoded):
        record['latent'] = latent
    for record in pending:
      writer.write(records.encode(record))
      sizes.append(record['size'])
    side['written'] += len(pending)
    pending.clear()

  tmp = job.path + '.tmp'
  writer = ArrayRecordWriter(tmp, 'group_size:1')
  try:
    for raw in _raw_examples(job):
      record, reason = convert(raw, opts)
      if record is None:
        if opts.on_bad_record == 'error':
          raise ValueError(f'{raw["key"]}: {reason} (--on_bad_record=error; use skip to count and '
                           'leave out such examples).')
        entry = side['reasons'].setdefault(skip_reason(reason), {'count': 0, 'examples': []})
        entry['count'] += 1
        if len(entry['examples']) < EXAMPLE_KEYS:
          entry['examples'].append(str(raw['key']))
        side['skipped'] += 1
      else:
        pending.append(record)
        if len(pending) >= record_text.BATCH:
          flush()
      unreported += 1
      if report and unreported >= 16:
        report(unreported)
        unreported = 0
    flush()
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  writer.close()
  side['sizes'] = records.pack_sizes(sizes)  # What bucketed training reads, not the records.
  _write_json(job.path + '.json', side)  # Before the rename: a final shard always has its sidecar.
  os.replace(tmp, job.path)
  if report and unreported:
    report(unreported)
  return side


# ------------------------------------------------------------------------------- the dataset


def _plan(source, output: str, num_shards: int, limit: int) -> tuple[list[_Job], int | None]:
  """The shard jobs (contiguous ranges of examples, or of whole tars) and the example count."""
  if isinstance(source, webdataset.TarSource):
    units, total = source.units(limit)
    part = lambda k, t=len(units): {'tars': units[k * t // num_shards:(k + 1) * t // num_shards]}
  else:
    total = min(len(source), limit) if limit else len(source)
    part = lambda k: {'start': k * total // num_shards, 'stop': (k + 1) * total // num_shards}
  return [_Job(k, shard_path(output, k, num_shards), part(k)) for k in range(num_shards)], total


def _check_existing(output: str, num_shards: int) -> None:
  """ValueError if `output` already has finished shards of another --num_shards."""
  for path in sorted(globlib.glob(globlib.escape(output) + '-?????-of-?????.array_record')):
    other = int(path[-len('.array_record') - 5:-len('.array_record')])
    if other != num_shards:
      raise ValueError(f'--output={output!r} already holds shards written with --num_shards={other} '
                       f'({path}); rerun with --num_shards={other}, or delete '
                       f'{output}-*-of-{other:05d}.array_record* to start again.')


def _finished(job: _Job, settings: dict) -> dict | None:
  """The sidecar of a finished shard written like this run would; None if it must be written."""
  if not (os.path.isfile(job.path) and os.path.isfile(job.path + '.json')):
    return None
  with open(job.path + '.json', encoding='utf-8') as f:
    side = json.load(f)
  for name, old, new in [('contents', side.get('contents'), job.contents)] + [
      (k, side.get('settings', {}).get(k), v) for k, v in settings.items()]:
    if json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
      raise ValueError(f'{job.path} was written with {name}={old!r}, this run has {name}={new!r} '
                       '(other flags, or the input changed); rerun with the same flags, or delete '
                       'its shards to start again.')
  return side


def _run(jobs: list[_Job], state: tuple, workers: int, bar) -> list[dict]:
  """Writes the shards of `jobs`: in this process, or in `workers` spawned processes."""
  if workers == 1 or len(jobs) <= 1:
    _init_worker(*state, bar.update)
    try:
      return [_write_shard(job) for job in jobs]
    finally:
      _STATE.clear()
  ctx = multiprocessing.get_context('spawn')
  progress = ctx.Queue()
  with futures.ProcessPoolExecutor(min(workers, len(jobs)), ctx, _init_worker,
                                   state + (progress.put,)) as pool:
    pending = [pool.submit(_write_shard, job) for job in jobs]
    try:
      while any(not f.done() for f in pending):
        try:
          bar.update(progress.get(timeout=0.2))
        except queuelib.Empty:
          pass
        for f in pending:
          if f.done() and f.exception():
            raise f.exception()  # A worker's error (or BrokenProcessPool if one died).
    except BaseException:
      for p in list((getattr(pool, '_processes', None) or {}).values()):
        p.terminate()  # Stop the other shards now (their .tmp files are redone on a rerun).
      raise
    while not progress.empty():
      bar.update(progress.get())
    return [f.result() for f in pending]


def _summary(output: str, num_shards: int, sides: list[dict], settings: dict) -> dict[str, Any]:
  reasons = {}
  for side in sides:
    for reason, entry in side['reasons'].items():
      total = reasons.setdefault(reason, {'count': 0, 'examples': []})
      total['count'] += entry['count']
      total['examples'] = (total['examples'] + entry['examples'])[:EXAMPLE_KEYS]
  return {'pattern': f'{output}-*.array_record', 'num_shards': num_shards,
          'written': sum(s['written'] for s in sides), 'skipped': sum(s['skipped'] for s in sides),
          'skip_reasons': reasons, 'settings': settings,
          'shards': [{k: s[k] for k in ('file', 'written', 'skipped', 'contents')} for s in sides]}


def prepare(source, output: str, *, num_shards: int, workers: int = 1,
            options: Options = Options(), limit: int = 0, progress: bool = True) -> dict[str, Any]:
  """Writes `source` as `num_shards` shards `{output}-k-of-N.array_record`; returns the summary.

  `source` is a random-access sequence of raw examples (`open_source`, any `data.sources` source)
  or a `webdataset.TarSource`. Finished shards of an earlier run with the same settings are kept.
  ValueError/FileNotFoundError (naming the flag or file) for what the user can fix.
  """
  options.check()
  for name, value, low in (('num_shards', num_shards, 1), ('workers', workers, 1), ('limit', limit, 0)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f'--{name}={value!r} must be an integer >= {low}.')
  if not output:
    raise ValueError('--output is empty: give the shards\' path prefix, e.g. --output=/data/shards/train.')
  output = os.path.abspath(output)
  if os.path.isdir(output):
    raise ValueError(f'--output={output!r} is a directory; give a file prefix inside it, e.g. '
                     f'{os.path.join(output, "train")}.')
  os.makedirs(os.path.dirname(output), exist_ok=True)
  _check_existing(output, num_shards)
  jobs, total = _plan(source, output, num_shards, limit)
  settings = dict(options.settings(), source=_describe(source))
  sides = {job.index: _finished(job, settings) for job in jobs}
  todo = [job for job in jobs if sides[job.index] is None]
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  done = sum(s['written'] + s['skipped'] for s in sides.values() if s)
  with tqdm(total=total, initial=done, unit='ex', desc=os.path.basename(output),
            disable=not progress or not todo) as bar:
    for side, job in zip(_run(todo, (source, options, settings), workers, bar), todo):
      sides[job.index] = side
  summary = _summary(output, num_shards, [sides[k] for k in range(num_shards)], settings)
  _write_json(output + '.summary.json', summary)
  return summary


# ------------------------------------------------------------------------------- command line


def _define_flags() -> None:
  flags.DEFINE_string('source', 'folder', f'What to convert: one of {SOURCES}.')
  flags.DEFINE_string('input', '', 'folder: the image folder; webdataset: tars (glob or {a..b}).')
  flags.DEFINE_string('output', '', 'Path prefix of the shards (e.g. /data/shards/train).')
  flags.DEFINE_integer('num_shards', 16, 'Output shards N.')
  flags.DEFINE_integer('workers', 1, 'Processes writing shards in parallel.')
  flags.DEFINE_integer('max_side', 0, 'Shrink images whose longer side is above this (0: never).')
  flags.DEFINE_string('format', 'keep', f'Stored image format: one of {FORMATS}.')
  flags.DEFINE_integer('quality', 95, 'JPEG/WebP quality when re-encoding.')
  flags.DEFINE_integer('limit', 0, 'Convert only the first N examples (0: all).')
  flags.DEFINE_string('on_bad_record', 'skip', 'skip (count unusable examples) or error (stop).')
  flags.DEFINE_string('caption_key', 'text', 'metadata.jsonl / webdataset .json field, or TFDS feature.')
  flags.DEFINE_string('tfds_name', '', 'tfds: the dataset name (prepared as ArrayRecord).')
  flags.DEFINE_string('split', 'train', 'tfds: the split.')
  flags.DEFINE_string('data_dir', '', 'tfds: the TFDS data directory.')
  flags.DEFINE_string('image_key', 'image', 'tfds: the image feature.')
  flags.DEFINE_string('text_encoder', '', "'pretrained': also store caption embeddings.")
  flags.DEFINE_string('pretrained_path', '', "Pretrained encoder folder ('': packaged MiniLM).")
  flags.DEFINE_integer('max_len', 0, 'Tokens per caption (0: configs/base.py text.max_len).')
  flags.DEFINE_string('autoencoder', '', 'A VAE folder: also store each image\'s posterior moments.')
  flags.DEFINE_integer('image_size', 0, '--autoencoder: the training data.image_size (centre crop).')
  flags.DEFINE_string('buckets', '', "Aspect-ratio buckets as data.buckets: '((h,w),(h,w),...)'.")
  flags.DEFINE_float('bucket_max_aspect', 0, 'Or generate them as data.bucket_max_aspect does '
                     '(with --image_size and --bucket_step).')
  flags.DEFINE_integer('bucket_step', 0, 'The multiple of a side the model takes (the training '
                       "start-up's 'sides multiples of'; default with --buckets: 1).")
  flags.DEFINE_string('autoencoder_dtype', 'float32', '--autoencoder: its compute dtype.')
  flags.DEFINE_bool('progress', True, 'Show a progress bar.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # TFDS logs its look-ups at INFO.
  try:
    if f.text_encoder not in ('', 'pretrained'):
      raise ValueError(f"--text_encoder={f.text_encoder!r}: use 'pretrained' (or leave it unset).")
    if f.autoencoder and f.image_size < 1 and not f.buckets:
      raise ValueError('--autoencoder needs --image_size (the data.image_size the run trains at) '
                       'or --buckets.')
    latent = (dict(path=f.autoencoder, image_size=f.image_size, dtype=f.autoencoder_dtype)
              if f.autoencoder else None)
    options = Options(max_side=f.max_side, fmt=f.format, quality=f.quality,
                      on_bad_record=f.on_bad_record, latent=latent,
                      buckets=bucket_option(f.buckets, f.image_size, f.bucket_max_aspect,
                                            f.bucket_step),
                      text=text_config(f.pretrained_path, f.max_len) if f.text_encoder else None)
    options.check()
    source = open_source(f.source, path=f.input, caption_key=f.caption_key, tfds_name=f.tfds_name,
                         split=f.split, data_dir=f.data_dir, image_key=f.image_key)
    summary = prepare(source, f.output, num_shards=f.num_shards, workers=f.workers,
                      options=options, limit=f.limit, progress=f.progress)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'Wrote {summary["written"]} records ({summary["skipped"]} skipped) to '
        f'{summary["pattern"]}; counts in {os.path.abspath(f.output)}.summary.json')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
