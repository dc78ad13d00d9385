"""A random CLIP (image and text towers) in transformers' `CLIPModel` folder layout, without torch.

The folder holds what `CLIPModel.save_pretrained` plus `CLIPProcessor.save_pretrained` write for
openai/clip-vit-*: config.json (model_type 'clip', projection_dim, text_config, vision_config),
model.safetensors (float32, transformers' tensor names: text_model.*, vision_model.*,
text_projection.weight, visual_projection.weight, logit_scale), preprocessor_config.json
(CLIPImageProcessor's fields) and the tokenizer files of tools/random_clip.py (vocab.json,
merges.txt, special_tokens_map.json, tokenizer_config.json). evaluation/clip_model.py and
transformers both read it; the weights are random, for tests and smoke runs, not for scores.

  python -m tools.random_clip_model OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from evaluation.clip_model import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from text.clip_tokenizer import EOS
from tools.random_clip import _WORDS, learn_merges, random_clip_tensors, write_tokenizer


def vision_tensors(cfg: dict, seed: int) -> dict[str, np.ndarray]:
  """Random CLIPVisionTransformer tensors (vision_model.*) for vision_config dict `cfg`.

  The encoder layers are the text tower's (the same CLIPEncoderLayer), so they are drawn by
  `random_clip_tensors` and renamed; its position embedding and final norm become the vision
  tower's position embedding and post_layernorm.
  """
  d, p = cfg['hidden_size'], cfg['patch_size']
  positions = (cfg['image_size'] // p) ** 2 + 1
  layers = random_clip_tensors(dict(cfg, vocab_size=1, max_position_embeddings=positions), seed)
  rename = {'text_model.embeddings.position_embedding.weight':
                'vision_model.embeddings.position_embedding.weight',
            'text_model.final_layer_norm.weight': 'vision_model.post_layernorm.weight',
            'text_model.final_layer_norm.bias': 'vision_model.post_layernorm.bias'}
  w = {rename.get(k, k.replace('text_model.', 'vision_model.')): v for k, v in layers.items()
       if 'token_embedding' not in k and 'position_ids' not in k}
  rng = np.random.default_rng(seed + 1)
  rand = lambda *shape, scale: (scale * rng.standard_normal(shape)).astype(np.float32)
  w['vision_model.embeddings.class_embedding'] = rand(d, scale=0.5)
  w['vision_model.embeddings.patch_embedding.weight'] = rand(d, cfg['num_channels'], p, p,
                                                             scale=1 / np.sqrt(3 * p * p))
  w['vision_model.pre_layrnorm.weight'] = 1 + rand(d, scale=0.1)
  w['vision_model.pre_layrnorm.bias'] = rand(d, scale=0.1)
  return w


def write_random_clip_model(folder: str, *, image_size: int = 32, patch_size: int = 8,
                            vision_hidden: int = 48, vision_layers: int = 2,
                            vision_heads: int = 3, text_hidden: int = 32, text_layers: int = 2,
                            text_heads: int = 2, projection_dim: int = 24,
                            hidden_act: str = 'quick_gelu', eos_token_id: int | None = 2,
                            crop_size: int | None = None, shortest_edge: int | None = None,
                            resample: int = 3, seed: int = 0) -> dict:
  """Writes a random CLIPModel folder; returns its config dict.

  Args:
    image_size, patch_size: the vision tower's input side and patch side (224 and 32, 16 or 14
      for ViT-B/32, ViT-B/16 and ViT-L/14; 336 and 14 for ViT-L/14@336).
    hidden_act: both towers' activation ('quick_gelu' as OpenAI CLIP, or 'gelu').
    eos_token_id: text_config's eos_token_id: 2 as openai/clip-vit-* configs say (transformers'
      legacy pooling at argmax(ids)), or None for the tokenizer's real <|endoftext|> id.
    crop_size, shortest_edge: preprocessor_config.json's crop_size and size (default image_size).
    resample: preprocessor_config.json's PIL filter (3: bicubic, as every CLIP folder says).
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  vocab = write_tokenizer(folder, learn_merges(list(_WORDS) * 2, 400), pad_token=EOS)
  text = {
      'model_type': 'clip_text_model', 'vocab_size': len(vocab), 'hidden_size': text_hidden,
      'intermediate_size': 2 * text_hidden, 'num_hidden_layers': text_layers,
      'num_attention_heads': text_heads, 'max_position_embeddings': 77, 'hidden_act': hidden_act,
      'layer_norm_eps': 1e-5, 'projection_dim': projection_dim, 'attention_dropout': 0.0,
      'initializer_factor': 1.0, 'initializer_range': 0.02, 'pad_token_id': 1,
      'bos_token_id': 0 if eos_token_id == 2 else vocab['<|startoftext|>'],
      'eos_token_id': vocab[EOS] if eos_token_id is None else eos_token_id,
  }
  vision = {
      'model_type': 'clip_vision_model', 'hidden_size': vision_hidden,
      'intermediate_size': 4 * vision_hidden, 'num_hidden_layers': vision_layers,
      'num_attention_heads': vision_heads, 'num_channels': 3, 'image_size': image_size,
      'patch_size': patch_size, 'hidden_act': hidden_act, 'layer_norm_eps': 1e-5,
      'projection_dim': projection_dim, 'attention_dropout': 0.0, 'initializer_factor': 1.0,
      'initializer_range': 0.02,
  }
  cfg = {'architectures': ['CLIPModel'], 'model_type': 'clip', 'projection_dim': projection_dim,
         'logit_scale_init_value': 2.6592, 'initializer_factor': 1.0, 'dtype': 'float32',
         'text_config': text, 'vision_config': vision}
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg, f, indent=2)
  rng = np.random.default_rng(seed + 2)
  proj = lambda n_in: (rng.standard_normal((projection_dim, n_in)) / np.sqrt(n_in)).astype(
      np.float32)
  tensors = {k: v for k, v in random_clip_tensors(text, seed).items() if 'position_ids' not in k}
  tensors.update(vision_tensors(vision, seed))
  tensors['text_projection.weight'] = proj(text_hidden)
  tensors['visual_projection.weight'] = proj(vision_hidden)
  tensors['logit_scale'] = np.asarray(2.6592, np.float32)
  save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
  crop, short = crop_size or image_size, shortest_edge or image_size
  processor = {
      'image_processor_type': 'CLIPImageProcessor', 'processor_class': 'CLIPProcessor',
      'do_resize': True, 'size': {'shortest_edge': short}, 'resample': resample,
      'do_center_crop': True, 'crop_size': {'height': crop, 'width': crop},
      'do_rescale': True, 'rescale_factor': 1 / 255, 'do_normalize': True,
      'image_mean': list(OPENAI_CLIP_MEAN), 'image_std': list(OPENAI_CLIP_STD), 'do_convert_rgb': True,
  }
  with open(os.path.join(folder, 'preprocessor_config.json'), 'w') as f:
    json.dump(processor, f, indent=2)
  return cfg


if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit('usage: python -m tools.random_clip_model OUT_DIR')
  write_random_clip_model(sys.argv[1])
