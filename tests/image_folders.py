"""Tiny captioned image folders made in the test: mixed formats, sizes and modes, and broken files."""
import io
import json
import os

import numpy as np
from PIL import Image

# name -> (format, mode, (width, height)); all captioned.
GOOD = {
    'a_rgb.jpg': ('JPEG', 'RGB', (40, 30)),
    'b_rgba.png': ('PNG', 'RGBA', (20, 50)),
    'c_grey.webp': ('WEBP', 'L', (33, 33)),
    'd_palette.png': ('PNG', 'P', (24, 18)),
    'e_cmyk.jpg': ('JPEG', 'CMYK', (30, 40)),
    'f_16bit.png': ('PNG', 'I;16', (36, 20)),
    'sub/g_rgb.webp': ('WEBP', 'RGB', (64, 48)),
    'sub/h_la.png': ('PNG', 'LA', (17, 25)),
}
BROKEN = {'x_zero.jpg': 'zero-byte file', 'y_truncated.png': 'truncated',
          'z_text.jpg': 'not an image file'}
NO_CAPTION = 'w_nocaption.png'


def make_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  w, h = size
  rgb = (rng.random((h, w, 3)) * 255).astype(np.uint8)
  img = Image.fromarray(rgb, 'RGB')
  if mode == 'I;16':
    return Image.fromarray((rng.random((h, w)) * 65535).astype(np.uint16))
  if mode == 'P':
    img = img.convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    img.info['transparency'] = 0
    return img
  return img.convert(mode)


def encode(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  kwargs = {'transparency': 0} if img.mode == 'P' else {}
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def captions_of(name: str) -> list[str]:
  stem = os.path.splitext(os.path.basename(name))[0]
  return [f'a photo of {stem.replace("_", " ")}', f'the {stem.split("_")[1]} picture']


def make_folder(root, *, broken: bool = True, txt_for=('c_grey.webp', 'sub/h_la.png')) -> dict:
  """Writes GOOD (+ BROKEN and an uncaptioned image); returns {relative path: captions}.

  Captions come from metadata.jsonl (two per image, as a list) except for `txt_for`, whose
  captions are in a .txt beside the image (one per line); sub/ has its own metadata.jsonl.
  """
  root = str(root)
  captions = {}
  meta = {'': [], 'sub': []}
  for i, (name, (fmt, mode, size)) in enumerate(sorted(GOOD.items())):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(encode(make_image(mode, size, i), fmt))
    caps = captions_of(name)
    captions[name] = caps
    if name in txt_for:
      with open(os.path.splitext(path)[0] + '.txt', 'w') as f:
        f.write('\n'.join(caps) + '\n')
    else:
      folder, base = os.path.split(name)
      meta[folder].append({'file_name': base, 'text': caps})
  if broken:
    good_png = encode(make_image('RGB', (40, 40), 99), 'PNG')
    blobs = {'x_zero.jpg': b'', 'y_truncated.png': good_png[:len(good_png) // 2],
             'z_text.jpg': b'this is not an image\n'}
    for name, blob in blobs.items():
      with open(os.path.join(root, name), 'wb') as f:
        f.write(blob)
      meta[''].append({'file_name': name, 'text': f'broken {name}'})
    with open(os.path.join(root, NO_CAPTION), 'wb') as f:
      f.write(encode(make_image('RGB', (20, 20), 7), 'PNG'))
  for folder, rows in meta.items():
    with open(os.path.join(root, folder, 'metadata.jsonl'), 'w') as f:
      f.write(''.join(json.dumps(r) + '\n' for r in rows))
  return captions
