"""Optional: CLIP embeddings, preprocessing and CLIP score against transformers and torchmetrics.

Needs torch and transformers (skipped otherwise); torchvision for CLIPImageProcessor's default
backend in transformers 5, torchmetrics for its CLIPScore (else its formula is applied to
transformers' embeddings here). Run with -s to see the measured differences:

  python -m pytest -s tests/test_evaluation_clip_reference.py
"""
import jax
import numpy as np
import pytest

from evaluation import clip_metrics, clip_model
from tools.random_clip_model import write_random_clip_model

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

CONFIGS = {  # Tiny stand-ins: ViT-B/16-like (quick_gelu, a 4 x 4 grid) and an odd one (gelu).
    'b16_quick_gelu': dict(image_size=32, patch_size=8, hidden_act='quick_gelu', eos_token_id=2),
    'gelu_42px_7': dict(image_size=42, patch_size=7, hidden_act='gelu', eos_token_id=None,
                        vision_hidden=64, vision_heads=4, text_hidden=48, text_heads=4,
                        projection_dim=40, shortest_edge=42, seed=5),
}
PROMPTS = ['a red circle', 'two dogs on a beach at sunset', 'a blue square left of a tree',
           '', 'a photo of a cat ' * 30]  # The last is cut to 77 tokens.
SHAPES = [(64, 80), (20, 30), (47, 33), (300, 200)]  # Shrink, grow, near 1, tall (+ exact).


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(our ClipModel, transformers' CLIPModel, the folder) of one random config."""
  folder = str(tmp_path_factory.mktemp(request.param))
  write_random_clip_model(folder, **CONFIGS[request.param])
  ref = transformers.CLIPModel.from_pretrained(folder).eval()
  return clip_model.load_clip_model(folder), ref, folder


def features(out):
  """transformers 5's get_*_features return a ModelOutput; 4.x a tensor."""
  return getattr(out, 'pooler_output', out)


def preprocess(ours, images):
  """Our pixels, jitted as inside image_embeds (eager float rounding can flip a uint8 tie)."""
  return jax.jit(ours.processing)(images)


def uint8_images(n, h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_embeddings_match_transformers(pair):
  ours, ref, folder = pair
  s = ours.module.vision.image_size
  pixels = np.asarray(preprocess(ours, uint8_images(4, s + 9, s + 20, 0)))  # The same tensor.
  with torch.no_grad():
    want = features(ref.get_image_features(torch.tensor(pixels).permute(0, 3, 1, 2))).numpy()
  got = np.asarray(ours.module.apply({'params': ours.params}, pixels,
                                     method=clip_model.CLIPModel.image_features))
  image_diff = np.abs(got - want).max()

  tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
  ids = tokenizer(PROMPTS, padding='max_length', truncation=True, max_length=77).input_ids
  np.testing.assert_array_equal(ours.tokenize(PROMPTS), ids)
  with torch.no_grad():
    want_text = features(ref.get_text_features(torch.tensor(ids))).numpy()
  text_diff = np.abs(np.asarray(ours.text_embeds(ours.params, np.asarray(ids))) - want_text).max()
  print(f'\n{folder}: max |ours - transformers| image {image_diff:.2e}, text {text_diff:.2e} '
        f'(embeddings up to {np.abs(want).max():.2f})')
  assert image_diff <= 1e-4 and text_diff <= 1e-4


@pytest.mark.parametrize('backend', ['CLIPImageProcessor', 'CLIPImageProcessorPil'])
def test_preprocessing_against_clip_image_processor(pair, backend):
  """uint8 images: our pixels vs the processor's, and the embeddings each pipeline gives."""
  if backend == 'CLIPImageProcessor':
    pytest.importorskip('torchvision')  # transformers 5's default backend.
  ours, ref, folder = pair
  processor = getattr(transformers, backend).from_pretrained(folder)
  s = ours.module.vision.image_size
  std = np.asarray(ours.processing.std)
  for i, shape in enumerate(SHAPES + [(s, s)]):
    u8 = uint8_images(4, *shape, seed=i + 1)
    want = processor(images=list(u8), return_tensors='np')['pixel_values'].transpose(0, 2, 3, 1)
    levels = np.abs(np.asarray(preprocess(ours, u8)) - want) * std * 255  # In uint8 levels.
    with torch.no_grad():
      want_emb = features(ref.get_image_features(torch.tensor(want).permute(0, 3, 1, 2))).numpy()
    emb = np.asarray(ours.image_embeds(ours.params, u8))
    cos = np.sum(clip_metrics.l2_normalize(emb) * clip_metrics.l2_normalize(want_emb), -1)
    print(f'\n{backend} {shape} -> {s}: pixels differ by <= {levels.max():.3f} uint8 levels on '
          f'{np.mean(levels > 0.01):.2%} of values; embeddings by <= '
          f'{np.abs(emb - want_emb).max():.1e}, cosine >= {cos.min():.6f}')
    assert levels.max() <= 1.001  # One uint8 rounding step at most.


class _TensorFeatures(torch.nn.Module):
  """transformers 5's CLIPModel with tensor-valued get_*_features, as torchmetrics 1.x expects."""

  def __init__(self, model):
    super().__init__()
    self.model, self.config = model, model.config

  def get_image_features(self, *args, **kwargs):
    return features(self.model.get_image_features(*args, **kwargs))

  def get_text_features(self, *args, **kwargs):
    return features(self.model.get_text_features(*args, **kwargs))


def test_clip_score_matches_torchmetrics(pair):
  ours, ref, folder = pair
  u8 = uint8_images(len(PROMPTS), 40, 50, seed=9)
  got_scores = clip_metrics.clip_scores(ours.image_embeds(ours.params, u8),
                                        ours.text_embeds(ours.params, ours.tokenize(PROMPTS)))
  processor = transformers.CLIPProcessor.from_pretrained(folder)
  try:
    from torchmetrics.multimodal.clip_score import CLIPScore  # pylint: disable=g-import-not-at-top
  except ImportError:
    CLIPScore = None  # pylint: disable=invalid-name
  if CLIPScore is not None:
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(ref), processor))
    prompts = PROMPTS[:-1]  # torchmetrics cuts an overlong prompt's end token off: not compared.
    metric.update(list(torch.tensor(u8[:-1]).permute(0, 3, 1, 2)), prompts)
    want_sum, want = float(metric.score), float(metric.compute())
    got_sum = float(np.sum(got_scores[:-1]))
    got = float(clip_metrics.clip_score(*[x[:-1] for x in _embeds(ours, u8, PROMPTS)]))
    what = 'torchmetrics CLIPScore'
  else:
    with torch.no_grad():
      inputs = processor(text=PROMPTS, images=list(u8), return_tensors='pt', padding=True)
      img = features(ref.get_image_features(inputs['pixel_values'])).numpy()
      txt = features(ref.get_text_features(inputs['input_ids'], inputs['attention_mask'])).numpy()
    cos = np.sum(clip_metrics.l2_normalize(img) * clip_metrics.l2_normalize(txt), -1)
    want_sum, want = float(np.sum(100 * cos)), max(float(np.mean(100 * cos)), 0.)
    got_sum, got = float(np.sum(got_scores)), float(clip_metrics.clip_score(*_embeds(ours, u8,
                                                                                    PROMPTS)))
    what = "torchmetrics' formula on transformers' embeddings"
  # The same embeddings through our formula: exact up to float32.
  with torch.no_grad():
    img = features(ref.get_image_features(torch.tensor(np.asarray(preprocess(ours, u8))).permute(
        0, 3, 1, 2))).numpy()
    txt = features(ref.get_text_features(torch.tensor(ours.tokenize(PROMPTS)))).numpy()
  same = clip_metrics.clip_scores(img, txt)
  np.testing.assert_allclose(same, got_scores, atol=1e-3)
  print(f'\n{folder}: sum of 100 cos: ours {got_sum:.4f}, {what} {want_sum:.4f}; score: ours '
        f'{got:.4f} vs {want:.4f}; per pair from the same pixels: <= '
        f'{np.abs(np.asarray(same) - np.asarray(got_scores)).max():.1e}')
  assert abs(got_sum - want_sum) < 0.05 * len(PROMPTS) and abs(got - want) < 0.05


def _embeds(ours, u8, prompts):
  return (ours.image_embeds(ours.params, u8),
          ours.text_embeds(ours.params, ours.tokenize(prompts)))
