"""One source example -> one jaxdiff record (data/records.py), as `python -m tools.prepare` stores it.

`Options` says how (resizing, image format, what else to store); `convert` checks that the example
is usable as the loader will (decodable image, a caption) and gives the record or the reason it
is skipped; `image_bytes` keeps the original bytes where they can stay.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import re
from typing import Any

import numpy as np
from PIL import Image

from data import buckets, images
from data.spec import ON_BAD_RECORD

FORMATS = ('keep', 'jpeg', 'png', 'webp')
# The sources and data/buckets.py name the loader's config fields in their errors; here the user
# typed these flags.
_FLAG_NAMES = (('data.path', '--input'), ('data.tfds_name', '--tfds_name'),
               ('data.image_key', '--image_key'), ('data.caption_key', '--caption_key'),
               ('data.train_split / data.eval_split', '--split'), ('data.buckets', '--buckets'),
               ('data.image_size', '--image_size'), ('data.bucket_max_aspect', '--bucket_max_aspect'))
_KEPT_FORMATS = ('JPEG', 'PNG', 'WEBP')


@dataclasses.dataclass(frozen=True)
class Options:
  """How each example is stored; recorded with every shard (a resumed run must use the same)."""
  max_side: int = 0  # Longer side above this: shrunk to it and re-encoded (0: never resize).
  fmt: str = 'keep'  # 'keep' (original bytes; JPEG when resized, PNG for arrays), 'jpeg', 'png', 'webp'.
  quality: int = 95  # JPEG/WebP quality when re-encoding.
  on_bad_record: str = 'skip'  # 'skip' (count it) or 'error' (the first unusable example is fatal).
  text: dict | None = None  # `text_config(...)`: store frozen-encoder embeddings of every caption.
  latent: dict | None = None  # {'path', 'image_size', 'dtype'}: store the VAE posterior's moments.
  buckets: tuple | None = None  # (height, width) pairs: store each record's bucket (data/buckets.py).

  def check(self):
    if self.fmt not in FORMATS:
      raise ValueError(f'--format={self.fmt!r} is not one of {FORMATS}.')
    if self.on_bad_record not in ON_BAD_RECORD:
      raise ValueError(f'--on_bad_record={self.on_bad_record!r} is not one of {ON_BAD_RECORD}.')
    if not isinstance(self.max_side, int) or self.max_side < 0:
      raise ValueError(f'--max_side={self.max_side!r} must be 0 (no resizing) or a positive size.')
    if not 1 <= self.quality <= 100:
      raise ValueError(f'--quality={self.quality!r} must be in [1, 100].')

  def settings(self) -> dict[str, Any]:
    text = self.text and {k: self.text[k] for k in ('pretrained_path', 'max_len', 'dtype')}
    return {'max_side': self.max_side, 'format': self.fmt, 'quality': self.quality, 'text': text,
            'latent': self.latent, 'buckets': self.buckets and [list(b) for b in self.buckets]}


def text_config(pretrained_path: str = '', max_len: int = 0) -> dict[str, Any]:
  """The `config.text` section of configs/base.py for a frozen pretrained encoder (plain dict)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  cfg = base.get_config().text
  cfg.encoder, cfg.pretrained_path = 'pretrained', pretrained_path
  if max_len:
    cfg.max_len = int(max_len)
  return cfg.to_dict()


def bucket_option(given: str, image_size: int, max_aspect: float, step: int) -> tuple | None:
  """--buckets (data.buckets' syntax) or --bucket_max_aspect (with --image_size, --bucket_step)
  -> the buckets, as data/buckets.py defines them from the config; None: neither flag."""
  if not given and not max_aspect:
    return None
  if given and max_aspect:
    raise ValueError('pass --buckets or --bucket_max_aspect, not both.')
  pairs = ()
  if given:
    try:
      pairs = ast.literal_eval(given)
    except (ValueError, SyntaxError):
      raise ValueError(f'--buckets={given!r} is not a tuple of (height, width) pairs, e.g. '
                       "'((64,64),(48,80),(80,48))'.") from None
    if not isinstance(pairs, (tuple, list)):
      pairs = (pairs,)
  elif step < 1 or image_size < 1:
    raise ValueError('--bucket_max_aspect needs --image_size (data.image_size) and --bucket_step '
                     "(what the model takes of a side: the training start-up's 'sides multiples "
                     "of'), or pass the buckets themselves with --buckets.")
  try:
    return buckets.define(pairs, image_size, max_aspect, max(step, 1))
  except ValueError as e:
    raise flag_named(e) from None


def flag_named(e: Exception) -> Exception:
  """The error `e` with the config fields it names replaced by the flags the user typed."""
  return type(e)(functools.reduce(lambda s, names: s.replace(*names), _FLAG_NAMES, str(e)))


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
  w, h = img.size
  scale = max_side / max(w, h)
  return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def image_bytes(image: bytes | np.ndarray, opts: Options) -> bytes:
  """The stored image: the original bytes when they can stay, else re-encoded; BadImage if unusable."""
  original, kind = None, None
  if isinstance(image, (bytes, bytearray)):
    img = images.decode(bytes(image))
    original, kind = bytes(image), img.format
    rgb = images.to_rgb(img)
  else:
    rgb = images.from_array(image)
  resize = bool(opts.max_side) and max(rgb.size) > opts.max_side
  if not resize and kind in _KEPT_FORMATS and opts.fmt in ('keep', kind.lower()):
    return original
  if resize:
    rgb = _shrink(rgb, opts.max_side)
  fmt = opts.fmt if opts.fmt != 'keep' else ('jpeg' if resize else 'png')
  return images.encode(rgb, fmt.upper(), opts.quality)


def skip_reason(message: str) -> str:
  """A skip reason without its trailing detail: 'image file is truncated (3 bytes ...)' -> '... truncated'."""
  return re.sub(r'\s*\([^()]*\)$', '', message).strip() or message


def convert(raw: dict[str, Any], opts: Options) -> tuple[dict[str, Any] | None, str]:
  """A raw source example -> (record without text or latents, '') or (None, the reason it is
  skipped). The record holds its image's size and, with `opts.buckets`, the nearest bucket."""
  if 'error' in raw:
    return None, raw['error']
  captions = list(raw.get('captions') or [])
  if not captions:
    return None, 'no caption'
  try:
    image = image_bytes(raw['image'], opts)
    size = buckets.image_size({'image': image})  # The header of what is stored.
  except images.BadImage as e:
    return None, str(e) or 'not an image'
  record = {'key': str(raw['key']), 'image': image, 'captions': captions, 'size': list(size)}
  if opts.buckets:
    record['bucket'] = list(opts.buckets[int(buckets.nearest(opts.buckets, [size])[0])])
  return record, ''
