"""CLIP image and text embeddings (Radford et al. 2021, arXiv:2103.00020) as pure jitted functions.

Reads a Hugging Face `CLIPModel` folder from local files (config.json with text_config and
vision_config, model.safetensors, the tokenizer files, preprocessor_config.json) for the quality
metrics of evaluation/clip_metrics.py. Any ViT CLIP transformers' CLIPModel runs: ViT-B/32,
ViT-B/16, ViT-L/14, ViT-L/14@336 (patch and image size from config.json).

  model = load_clip_model('/models/clip-vit-large-patch14')
  img = model.image_embeds(model.params, images)            # [N, H, W, 3] in [0, 1] -> [N, D]
  txt = model.text_embeds(model.params, model.tokenize(prompts))             # -> [N, D]

Both are jitted and pure, return float32 projected embeddings (get_image_features /
get_text_features), unnormalised unless `normalize=True`. The text tower is text/clip.py's
CLIPTextTransformer (its converter, its tokenizer, padded to 77); the vision tower is
CLIPVisionTransformer: a bias-free patch convolution, the class embedding, position embeddings,
pre_layrnorm, the same pre-LN encoder layers without a causal mask, post_layernorm on the class
token, then `visual_projection`.

Preprocessing is CLIPImageProcessor's, in the jitted function: resize the shorter side to
`size.shortest_edge` (bicubic with PIL's kernel, antialiased when shrinking), centre crop to
`crop_size` (offsets rounded down), normalise with `image_mean` / `image_std`. The resize runs in
float32 as PIL (and torchvision on uint8) runs it: width, then height, each pass clipped and
rounded to the uint8 grid; what is left are rounding ties, at most one uint8 level on under 1% of
values (docs/evaluation.md, CLIP section).
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evaluation.clip_metrics import l2_normalize
from models import layers, weights
from text import clip, clip_tokenizer
from text.bert import layer_norm

WEIGHTS = 'model.safetensors'
PREPROCESSOR = 'preprocessor_config.json'
VISION_PREFIX = 'vision_model.'
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD.
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {2: 'linear', 3: 'bicubic'}  # PIL's filter numbers -> jax.image.resize methods.
# transformers' CLIPTextConfig defaults for the fields text/clip.py requires.
_TEXT_DEFAULTS = {'vocab_size': 49408, 'hidden_size': 512, 'intermediate_size': 2048,
                  'num_hidden_layers': 12, 'num_attention_heads': 8}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """transformers' CLIPVisionConfig fields that shape the tower, with its defaults (ViT-B/32)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  def validate(self, source: str) -> None:
    """Raises ValueError naming `source` and the field if we do not implement this tower."""
    for name in ('image_size', 'patch_size'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{source}: {name}={value!r} must be one positive int (a square image '
                         'and square patches).')
    if self.patch_size > self.image_size:
      raise ValueError(f'{source}: patch_size={self.patch_size} exceeds image_size='
                       f'{self.image_size}.')
    if self.num_channels != 3:
      raise ValueError(f'{source}: num_channels={self.num_channels!r}; only RGB (3) is supported.')
    # The encoder layers are the text tower's: its checks of heads and hidden_act apply.
    clip.CLIPTextConfig(1, self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                        self.num_attention_heads, hidden_act=self.hidden_act).validate(source)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
  """CLIPImageProcessor's steps as preprocessor_config.json sets them (resized to `size` (h, w)
  or its shorter side to `shortest_edge`, or neither; then centre-cropped to `crop` if set)."""
  shortest_edge: int | None
  size: tuple[int, int] | None
  crop: tuple[int, int] | None
  resample: str
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def resized(self, height: int, width: int) -> tuple[int, int]:
    """The (height, width) an image of that size is resized to (transformers' rounding)."""
    if self.size is not None:
      return self.size
    if self.shortest_edge is None:
      return height, width
    s = self.shortest_edge
    return (s, int(s * width / height)) if height <= width else (int(s * height / width), s)

  def __call__(self, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] float in [0, 1] (or uint8) -> the normalised model input [N, h, w, 3] f32."""
    x = images / 255 if images.dtype == jnp.uint8 else images
    x = x.astype(jnp.float32)
    n, height, width, channels = x.shape
    h, w = self.resized(height, width)
    # As PIL (and torchvision, on uint8) resize: the width pass, then the height pass, each
    # antialiased when shrinking and its result clipped and rounded to the uint8 grid.
    for shape in ((n, height, w, channels), (n, h, w, channels)):
      if shape != x.shape:
        x = jax.image.resize(x, shape, self.resample, antialias=True)
        x = jnp.round(jnp.clip(x, 0, 1) * 255) / 255
    if self.crop is not None:
      ch, cw = self.crop
      if ch > h or cw > w:
        raise ValueError(f'images of {height}x{width} are smaller than the crop {ch}x{cw}.')
      top, left = (h - ch) // 2, (w - cw) // 2
      x = x[:, top:top + ch, left:left + cw]
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)


class CLIPVisionTransformer(nn.Module):
  """Normalised pixels [N, S, S, 3] -> pooled [N, D] float32 (post_layernorm of the class token)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    if pixels.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f'pixels are {pixels.shape[1]}x{pixels.shape[2]}; the model takes '
                       f'{c.image_size}x{c.image_size} (preprocess them to its crop size).')
    p = c.patch_size
    x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype,
                name='patch_embedding')(pixels.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, c.hidden_size).astype(jnp.float32)  # Row-major patches.
    cls = self.param('class_embedding', nn.initializers.normal(0.02), (c.hidden_size,),
                     self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(jnp.float32), (x.shape[0], 1, x.shape[2])),
                         x], axis=1)
    x = x + nn.Embed(c.num_positions, c.hidden_size, param_dtype=self.param_dtype,
                     name='position_embedding')(jnp.arange(c.num_positions))[None]
    x = layer_norm(c.layer_norm_eps, self.param_dtype, 'pre_layrnorm')(x)
    attend_all = jnp.ones((1, 1, 1, 1), bool)  # No causal mask in the vision tower.
    for i in range(c.num_hidden_layers):
      x = clip.CLIPEncoderLayer(c, self.dtype, self.param_dtype, name=f'layers_{i}')(
          x, attend_all)
    return layer_norm(c.layer_norm_eps, self.param_dtype, 'post_layernorm')(x[:, 0])


class CLIPModel(nn.Module):
  """transformers' CLIPModel without its logit scale: `image_features` and `text_features`."""
  text: clip.CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    self.text_model = clip.CLIPTextTransformer(self.text, 0, self.dtype, self.param_dtype)
    self.vision_model = CLIPVisionTransformer(self.vision, self.dtype, self.param_dtype)
    proj = functools.partial(nn.Dense, self.projection_dim, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    self.visual_projection, self.text_projection = proj(), proj()

  def image_features(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

  def text_features(self, ids: jax.Array) -> jax.Array:
    return self.text_projection(self.text_model(ids)[1]).astype(jnp.float32)

  def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.image_features(pixels), self.text_features(ids)


@functools.partial(jax.jit, static_argnames=('module', 'processing', 'normalize'))
def image_embeds(params: Any, images: jax.Array, *, module: CLIPModel,
                 processing: ImageProcessing, normalize: bool = False) -> jax.Array:
  """images [N, H, W, 3] in [0, 1] -> projected embeddings [N, projection_dim] float32."""
  out = module.apply({'params': params}, processing(images), method=CLIPModel.image_features)
  return l2_normalize(out) if normalize else out


@functools.partial(jax.jit, static_argnames=('module', 'normalize'))
def text_embeds(params: Any, ids: jax.Array, *, module: CLIPModel, normalize: bool = False
                ) -> jax.Array:
  """ids [N, L] int32 (`ClipModel.tokenize`) -> projected embeddings [N, projection_dim] f32."""
  out = module.apply({'params': params}, ids, method=CLIPModel.text_features)
  return l2_normalize(out) if normalize else out


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
  """A loaded CLIPModel folder: frozen params and the pure functions that embed with them."""
  path: str
  module: CLIPModel
  processing: ImageProcessing
  params: Any
  tokenizer: clip_tokenizer.CLIPTokenizer
  fingerprint: str  # Folder, architecture, preprocessing, tokenizer and weights digest.

  @property
  def dim(self) -> int:
    return self.module.projection_dim

  def tokenize(self, captions: Sequence[str]) -> np.ndarray:
    """Captions -> int32 ids [N, 77]: <|startoftext|> ... <|endoftext|> (cut to 77), padding."""
    return self.tokenizer.encode(captions)

  def image_embeds(self, params: Any, images: jax.Array, *, normalize: bool = False
                   ) -> jax.Array:
    """Jitted, pure: images [N, H, W, 3] in [0, 1] (or uint8) -> [N, dim] float32."""
    return image_embeds(params, images, module=self.module, processing=self.processing,
                        normalize=normalize)

  def text_embeds(self, params: Any, ids: jax.Array, *, normalize: bool = False) -> jax.Array:
    """Jitted, pure: ids [N, L] -> [N, dim] float32."""
    return text_embeds(params, ids, module=self.module, normalize=normalize)


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); {what}.') from e
  if not isinstance(out, dict):
    raise ValueError(f'{path} holds a {type(out).__name__}, not an object; {what}.')
  return out


def _section(cfg: dict, name: str, path: str, defaults: dict) -> dict:
  """config.json's `name` section, as transformers' CLIPConfig reads it (a legacy
  `name`_dict, completed with the defaults, replaces it)."""
  legacy = cfg.get(f'{name}_dict')
  section = legacy if isinstance(legacy, dict) else cfg.get(name)
  if not isinstance(section, dict):
    raise ValueError(f'{path}: {name} is missing or not an object; a CLIPModel config.json holds '
                     'text_config and vision_config.')
  return {**defaults, **section}


def read_config(folder: str) -> tuple[clip.CLIPTextConfig, CLIPVisionConfig, int]:
  """FOLDER/config.json (transformers' CLIPConfig) -> checked (text, vision, projection_dim)."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: a CLIPModel folder holds config.json, {WEIGHTS}, '
                            f'the tokenizer files and {PREPROCESSOR}.')
  cfg = _read_json(path, 'a CLIPModel config.json is a JSON object')
  if cfg.get('model_type') != 'clip':
    raise ValueError(f"{path}: model_type={cfg.get('model_type')!r}, expected 'clip' "
                     "(transformers' CLIPModel, both towers); a text_encoder/ folder is read by "
                     'text.clip.load_clip.')
  towers = []
  for cls, name, defaults in ((clip.CLIPTextConfig, 'text_config', _TEXT_DEFAULTS),
                              (CLIPVisionConfig, 'vision_config', {})):
    towers.append(cls(**weights.dataclass_fields(cls, _section(cfg, name, path, defaults),
                                                 f'{path} {name}')))
    towers[-1].validate(f'{path} {name}')
  text, vision = towers
  projection_dim = cfg.get('projection_dim', 512)
  if not isinstance(projection_dim, int) or projection_dim < 1:
    raise ValueError(f'{path}: projection_dim={projection_dim!r} must be a positive int.')
  return text, vision, projection_dim


def _pair(value: Any, field: str, path: str) -> tuple[int, int]:
  """An int or {'height': h, 'width': w} -> (h, w)."""
  if isinstance(value, int):
    return value, value
  if isinstance(value, dict) and set(value) >= {'height', 'width'}:
    return int(value['height']), int(value['width'])
  raise ValueError(f'{path}: {field}={value!r} is not supported; use an int or '
                   '{"height": h, "width": w}.')


def read_processing(folder: str, image_size: int) -> ImageProcessing:
  """FOLDER/preprocessor_config.json -> `ImageProcessing`; without the file, CLIP's own steps
  at the model's size (shorter side to image_size, centre crop, OpenAI mean and std)."""
  path = os.path.join(folder, PREPROCESSOR)
  p = _read_json(path, "CLIPImageProcessor's settings") if os.path.isfile(path) else {}
  resample = _RESAMPLE.get(p.get('resample', 3))
  if resample is None:
    raise ValueError(f"{path}: resample={p['resample']!r} is not supported; use 3 (bicubic, as "
                     'CLIP) or 2 (bilinear).')
  if p.get('do_rescale', True) and abs(p.get('rescale_factor', 1 / 255) - 1 / 255) > 1e-12:
    raise ValueError(f"{path}: rescale_factor={p['rescale_factor']!r}; only 1/255 (uint8 images "
                     'to [0, 1], the range image_embeds takes) is supported.')
  shortest = size = crop = None
  if p.get('do_resize', True):
    value = p.get('size', {'shortest_edge': image_size})
    if isinstance(value, dict) and 'shortest_edge' in value:
      value = value['shortest_edge']
    if isinstance(value, int) and not p.get('use_square_size', False):
      shortest = value
    else:
      size = _pair(value, 'size', path)
  if p.get('do_center_crop', True):
    crop = _pair(p.get('crop_size', image_size), 'crop_size', path)
  out_size = crop or size
  if out_size != (image_size, image_size):
    raise ValueError(f'{path}: crop_size (or size) gives {out_size} images but config.json says '
                     f'vision_config.image_size={image_size}; they must agree.')
  if crop is not None and (shortest is not None and min(crop) > shortest or
                           size is not None and (crop[0] > size[0] or crop[1] > size[1])):
    raise ValueError(f'{path}: crop_size {crop} exceeds the resized size; padding is not '
                     'supported.')
  mean, std = ((tuple(p.get('image_mean', OPENAI_CLIP_MEAN)), tuple(p.get('image_std',
                OPENAI_CLIP_STD))) if p.get('do_normalize', True) else ((0., 0., 0.), (1., 1., 1.)))
  if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
    raise ValueError(f'{path}: image_mean={list(mean)} and image_std={list(std)} must be 3 '
                     'numbers each (RGB), the stds positive.')
  return ImageProcessing(shortest, size, crop, resample, tuple(map(float, mean)),
                         tuple(map(float, std)))


def _read_tensors(folder: str) -> tuple[dict[str, np.ndarray], str]:
  found = weights.read_safetensors(folder, WEIGHTS)
  if found is not None:
    return found
  pickles = sorted(os.path.basename(p) for ext in ('bin', 'ckpt', 'pt', 'pth')
                   for p in glob.glob(os.path.join(folder, f'*.{ext}')))
  hint = (f'; it holds {pickles}, PyTorch pickles, which are not read (they can run code): '
          'convert once where torch is installed with transformers.CLIPModel.from_pretrained(DIR)'
          '.save_pretrained(DIR, safe_serialization=True)' if pickles else '')
  raise FileNotFoundError(f'{os.path.join(folder, WEIGHTS)} not found (nor {WEIGHTS}.index.json)'
                          f'{hint}.')


def load_clip_model(folder: str, *, dtype: str = 'float32') -> ClipModel:
  """Loads a transformers CLIPModel folder as a frozen `ClipModel`.

  Args:
    folder: config.json (model_type 'clip'), model.safetensors (or its sharded index),
      vocab.json and merges.txt (with special_tokens_map.json / tokenizer_config.json), and
      preprocessor_config.json (optional: CLIP's defaults at the model's image size).
    dtype: compute dtype of the matmuls ('float32' or 'bfloat16'); layer norms, softmax and the
      embeddings stay float32. The weights are kept in float32.
  """
  folder = os.path.abspath(os.path.expanduser(folder))
  text, vision, projection_dim = read_config(folder)
  compute_dtype = layers.resolve_dtype(dtype, 'dtype')
  processing = read_processing(folder, vision.image_size)
  tokenizer = clip_tokenizer.load_tokenizer(folder, text.max_position_embeddings)
  if tokenizer.vocab_size > text.vocab_size:
    raise ValueError(f'{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json '
                     f'says text_config.vocab_size={text.vocab_size}: they belong to different '
                     'models.')
  tensors, source = _read_tensors(folder)
  get = lambda prefix: weights.TensorGetter(tensors, source, (prefix,), jnp.float32)
  v, dv = get(VISION_PREFIX), vision.hidden_size
  vision_params = {
      'patch_embedding': {'kernel': v('embeddings.patch_embedding.weight', (
          dv, 3, vision.patch_size, vision.patch_size)).transpose(2, 3, 1, 0)},  # OIHW -> HWIO
      'class_embedding': v('embeddings.class_embedding', (dv,)),
      'position_embedding': {'embedding': v('embeddings.position_embedding.weight',
                                            (vision.num_positions, dv))},
      'pre_layrnorm': clip.convert_norm(v, 'pre_layrnorm', dv),
      **{f'layers_{i}': clip.convert_layer(v, vision, f'encoder.layers.{i}')
         for i in range(vision.num_hidden_layers)},
      'post_layernorm': clip.convert_norm(v, 'post_layernorm', dv),
  }
  top = get('')
  params = {
      'text_model': clip.convert_hf_weights(get(clip.PREFIX), text),
      'vision_model': vision_params,
      'visual_projection': {'kernel': top('visual_projection.weight', (projection_dim, dv)).T},
      'text_projection': {'kernel': top('text_projection.weight',
                                        (projection_dim, text.hidden_size)).T},
  }
  module = CLIPModel(text, vision, projection_dim, compute_dtype, jnp.float32)
  shapes = (jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, 3), jnp.float32),
            jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32))
  abstract = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *shapes)['params']
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(abstract))
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if expected != got:  # A bug in the converter, not a user error.
    raise AssertionError(f'converted CLIPModel params do not match the module: {got} vs '
                         f'{expected}')
  arch = hashlib.sha256(repr((module, processing)).encode()).hexdigest()[:8]
  fingerprint = (f'clip_model:{folder}:config={arch}:tokenizer={tokenizer.fingerprint()}:'
                 f'{weights.digest(params)}')
  return ClipModel(folder, module, processing, jax.tree.map(jnp.asarray, params), tokenizer,
                   fingerprint)
