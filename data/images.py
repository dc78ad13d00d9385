"""Image decoding and the train-time geometry: any file or array -> RGB uint8 [S, S, 3].

`to_rgb` converts what can be converted (grey, grey+alpha, RGBA, palette, CMYK, 16-bit and
float modes; EXIF rotation applied) and raises `BadImage` with the reason for what cannot be read
(zero bytes, truncated, not an image). `fit` resizes the shorter side to S with an antialiased
filter and crops an S x S square (centre, or at a given offset for random crops), resampling
only the cropped window.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')  # What the folder source and `tools.prepare` read.
# Decompression-bomb guard: refuse images above this many pixels (about 16k x 16k).
MAX_PIXELS = 256 * 1024 * 1024


class BadImage(ValueError):
  """An image that cannot be used; the message is the reason (the caller adds the path)."""


def decode(data: bytes) -> Image.Image:
  """Encoded bytes -> a fully loaded PIL image in its own mode; BadImage if unreadable."""
  if not data:
    raise BadImage('zero-byte file')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      if img.width * img.height > MAX_PIXELS:
        raise BadImage(f'{img.width}x{img.height} pixels is above the {MAX_PIXELS} limit')
      img.load()
  except BadImage:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
          Image.DecompressionBombError) as e:
    reason = str(e) or type(e).__name__
    if isinstance(e, Image.UnidentifiedImageError):
      reason = 'not an image file'
    raise BadImage(reason) from None
  return img


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB version of any PIL image: alpha composited on white, 16-bit/float scaled to 8 bits."""
  try:
    ImageOps.exif_transpose(img, in_place=True)  # (Not a copy: most images need no rotation.)
  except (OSError, ValueError, TypeError, KeyError):  # A broken EXIF block: keep the pixels as stored.
    pass
  if img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
    img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
  elif img.mode == 'F':
    a = np.asarray(img, dtype=np.float64)
    top = 1.0 if a.max() <= 1.0 else 255.0
    img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), 'L')
  if img.mode == 'P':
    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
  if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, rgba)
  if img.mode != 'RGB':
    img = img.convert('RGB')  # L, 1, CMYK, YCbCr, LAB, HSV.
  return img


def load_rgb(data: bytes) -> Image.Image:
  """Encoded bytes -> RGB PIL image; BadImage with the reason if it cannot be used."""
  return to_rgb(decode(data))


def from_array(array: np.ndarray) -> Image.Image:
  """A decoded image array (TFDS: uint8 [H, W, C] with C in 1, 3, 4) -> RGB PIL image."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise BadImage(f'image array of shape {a.shape} is not [H, W], [H, W, 1|3|4]')
  if a.dtype == np.uint16:
    a = (a.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
  elif a.dtype != np.uint8:
    raise BadImage(f'image array of dtype {a.dtype} (expected uint8 or uint16)')
  return to_rgb(Image.fromarray(a))


def crop_offsets(width: int, height: int, size: int, u: float | None = None,
                 v: float | None = None, crop_height: int | None = None) -> tuple[int, int]:
  """Top-left (x, y) of the size x size crop (size wide, `crop_height` high if given): centred, or
  at fractions u, v in [0, 1) of the slack."""
  dx, dy = width - size, height - (size if crop_height is None else crop_height)
  if u is None:
    return dx // 2, dy // 2
  return int(u * (dx + 1)), int(v * (dy + 1))


def fit(img: Image.Image, size: int, *, upscale: bool = True, crop_uv: tuple[float, float] | None = None,
        flip: bool = False) -> np.ndarray:
  """RGB uint8 [size, size, 3]: the shorter side resized to `size`, a square crop, a flip.

  The crop is centred, or at fractions `crop_uv` of the slack. Only the cropped window is
  resampled (PIL's `resize(box=)`: bicubic, antialiased when shrinking), which is the
  resize-then-crop picture (within a few levels) at 2/3 of the work for 4:3 images. BadImage if
  the shorter side is below `size` and not `upscale`.
  """
  if min(img.size) < size and not upscale:
    raise BadImage(f'{img.width}x{img.height} is smaller than data.image_size={size} and '
                   'data.upscale=False')
  return cover(img, size, size, crop_uv=crop_uv, flip=flip)[0]


def cover(img: Image.Image, height: int, width: int, *, upscale: bool = True,
          crop_uv: tuple[float, float] | None = None, flip: bool = False
          ) -> tuple[np.ndarray, tuple[int, int]]:
  """(RGB uint8 [height, width, 3], crop (top, left) in the resized image): `img` resized to
  cover height x width (the smallest scale at which both sides fit), cropped as `fit` crops.

  BadImage if that needs enlarging and not `upscale`.
  """
  w, h = img.size
  scale, resized, (y, x) = cover_crop(w, h, height, width, crop_uv)
  if scale > 1 and not upscale:
    raise BadImage(f'{w}x{h} is smaller than the {width}x{height} bucket and data.upscale=False')
  if scale == 1:  # No resampling: a plain crop.
    if (w, h) != (width, height):
      img = img.crop((x, y, x + width, y + height))
  else:
    sx, sy = w / resized[0], h / resized[1]  # The resize-then-crop sampling grid, per axis.
    box = (x * sx, y * sy, (x + width) * sx, (y + height) * sy)
    img = img.resize((width, height), Image.Resampling.BICUBIC, box=box,
                     reducing_gap=None if scale > 1 else 3.0)
  out = np.asarray(img, dtype=np.uint8)
  if flip:
    out = out[:, ::-1]
  return np.ascontiguousarray(out), (y, x)


def cover_crop(w: int, h: int, height: int, width: int,
               crop_uv: tuple[float, float] | None = None
               ) -> tuple[float, tuple[int, int], tuple[int, int]]:
  """Where `cover` crops a w x h image to height x width: (the scale, the resized (width,
  height), the crop's (top, left) in it). Needs the size alone (cached latents: no pixels)."""
  scale = max(width / w, height / h)
  resized = (max(width, round(w * scale)), max(height, round(h * scale)))
  x, y = crop_offsets(*resized, width, *(crop_uv or (None, None)), crop_height=height)
  return scale, resized, (y, x)


def encode(img: Image.Image | np.ndarray, fmt: str = 'JPEG', quality: int = 95) -> bytes:
  """Encodes an RGB image (PIL or uint8 array) as JPEG/PNG/WEBP bytes."""
  if isinstance(img, np.ndarray):
    img = Image.fromarray(img)
  buf = io.BytesIO()
  kwargs = {'quality': quality} if fmt.upper() in ('JPEG', 'WEBP') else {}
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()
