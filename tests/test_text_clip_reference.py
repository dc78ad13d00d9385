"""Optional: the CLIP tokenizer and text encoder against transformers (needs torch + transformers).

  JAXDIFF_CLIP_BPE=/path/to/bpe_simple_vocab_16e6.txt.gz python -m pytest -s \\
      tests/test_text_clip_reference.py

The real-vocabulary check needs open_clip's merges file (unzip it from the open_clip_torch wheel);
it is skipped without JAXDIFF_CLIP_BPE. transformers 4.x's CLIPTokenizer is the slow Python one
SD pipelines ran (without ftfy); transformers 5 only has the tokenizers-backed one, which differs
from it on CJK, control/format characters, upper-case special tokens and word-final sigma: those
prompts are compared only against the slow tokenizer.
"""
import os
import sys

import jax
import numpy as np
import pytest

from text import clip, clip_tokenizer
from tools import random_clip

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

COMMON = [
    'a photograph of an astronaut riding a horse',
    'A painting of a Cat, in the style of Van Gogh!!! (masterpiece:1.2), 8k, ultra-detailed',
    "it's a dog's life; they're here & we've got 3.14159 apples for $5, I'd say #tag @me",
    'Ünïcödé café naïve résumé — “quotes”',
    '½ ² ٣ 𝟘 İstanbul ÆØÅ straße',
    'emoji 🐱 🎉 and ﬁ ligature ſtar',
    'hello!! world! ! !!!',
    'Tab\tNew\nLine\r\nSpace\u00a0nb\u3000ideo   end  ',
    '<|startoftext|>x<|endoftext|>y',
    '',
    'a ' * 100,
    'a highly detailed matte painting of a castle on a cliff above a stormy sea at sunset, '
    'dramatic lighting, volumetric clouds, by greg rutkowski and thomas kinkade, trending on '
    'artstation, octane render, 4k, 8k, unreal engine, cinematic, epic composition, ' * 2,
]
SLOW_ONLY = [
    '日本語のテキストとカタカナ 한국어 中文',  # The slow tokenizer spaces CJK ideographs.
    'A\u0000B\ufffdC\x07D\u2028E\u200bF',  # It drops control and format characters.
    'emoji 🐱\u200d👤',  # (the zero-width joiner among them)
    '<|ENDOFTEXT|> a\u0345b',  # Lower-cased special tokens; U+0345, which the regex skips.
    'ΣΑΣ ΟΔΟΣ',  # Python's lower() writes a word-final sigma as ς.
]


def reference_tokenizer(folder):
  tok = transformers.CLIPTokenizer.from_pretrained(folder)
  return tok, not tok.is_fast


def check_ids(folder, max_len=77):
  ours = clip_tokenizer.load_tokenizer(folder, max_len)
  ref, slow = reference_tokenizer(folder)
  prompts = COMMON + (SLOW_ONLY if slow else [])
  expected = ref(prompts, padding='max_length', truncation=True, max_length=max_len).input_ids
  got = ours.encode(prompts)
  for prompt, want, have in zip(prompts, expected, got):
    assert have.tolist() == want, (prompt, ref.tokenize(prompt), ours.tokens(prompt))
  n = len(COMMON)
  assert got[n - 1, -1] == got[n - 2, -1] == ours.eos_id  # The long ones: cut, EOS kept.
  return slow


@pytest.mark.parametrize('pad', ['<|endoftext|>', '!'])
def test_tokenizer_ids_match_transformers_on_random_vocab(tmp_path, pad):
  random_clip.write_tokenizer(str(tmp_path), random_clip.learn_merges(random_clip._WORDS, 400),
                              pad_token=pad)
  slow = check_ids(str(tmp_path))
  print(f'random vocab, pad {pad!r}: {"slow" if slow else "fast"} CLIPTokenizer '
        f'{transformers.__version__}, {len(COMMON) + slow * len(SLOW_ONLY)} prompts identical')


@pytest.mark.parametrize('pad', ['<|endoftext|>', '!'])
def test_tokenizer_ids_match_transformers_on_real_clip_vocab(tmp_path, pad):
  path = os.environ.get('JAXDIFF_CLIP_BPE', '')
  if not os.path.isfile(path):
    pytest.skip('set JAXDIFF_CLIP_BPE to open_clip\'s bpe_simple_vocab_16e6.txt.gz')
  vocab = random_clip.write_tokenizer(str(tmp_path), random_clip.read_open_clip_merges(path),
                                      pad_token=pad)
  assert len(vocab) == 49408 and vocab['<|endoftext|>'] == 49407
  slow = check_ids(str(tmp_path))
  ours = clip_tokenizer.load_tokenizer(str(tmp_path))
  # Known SD ids: "a photograph of an astronaut riding a horse".
  assert ours.ids(COMMON[0]) == [320, 8853, 539, 550, 18376, 6765, 320, 4558]
  print(f'real CLIP vocab, pad {pad!r}: {"slow" if slow else "fast"} CLIPTokenizer identical')


def test_pre_tokenizer_regex_matches_the_regex_module_on_every_code_point():
  regex = pytest.importorskip('regex')
  reference = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                            r'[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+', regex.IGNORECASE)
  ours = clip_tokenizer.word_pattern()
  # Every character that survives cleaning (unassigned, private-use and control ones do not),
  # after a quote (contractions), next to letters, digits and punctuation.
  chars = [chr(cp) for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
  kept = [c for c in chars if clip_tokenizer.clean_text(c) == c]
  for i in range(0, len(kept), 256):
    text = ' '.join(f"'{c}a{c}1{c}.{c}" for c in kept[i:i + 256])
    assert reference.findall(text) == ours.findall(text), kept[i:i + 256]
  # Characters that case-fold onto the literals' letters, in place of each of those letters.
  literals = ['<|startoftext|>', '<|endoftext|>', "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
  letters = set(''.join(literals))
  odd = [c for c in chars if c not in letters and set(c.lower() + c.upper() + c.casefold()) &
         letters]
  for lit in literals:
    for i in range(len(lit)):
      texts = [clip_tokenizer.clean_text(lit[:i] + c + lit[i + 1:] + 'x') for c in odd]
      assert [reference.findall(t) for t in texts] == [ours.findall(t) for t in texts]


def reference_outputs(folder, ids, clip_skip):
  """transformers' CLIPTextModel; clip_skip as diffusers' encode_prompt applies it."""
  model = transformers.CLIPTextModel.from_pretrained(folder).eval()
  with torch.no_grad():
    out = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
    hidden = out.last_hidden_state
    if clip_skip:
      norm = getattr(model, 'text_model', model).final_layer_norm  # transformers 5: flattened.
      hidden = norm(out.hidden_states[-(clip_skip + 1)])
  return hidden.numpy(), out.pooler_output.numpy()


CONFIGS = {
    'sd1': dict(hidden_act='quick_gelu', eos_token_id=2, pad_token='<|endoftext|>'),
    'sd2': dict(hidden_act='gelu', eos_token_id=None, pad_token='!'),
    # SD 2.x's own text_encoder/config.json still says eos_token_id 2 (pooling at argmax(ids)).
    'sd2_legacy': dict(hidden_act='gelu', eos_token_id=2, pad_token='!'),
}


@pytest.mark.parametrize('name,clip_skip', [('sd1', 0), ('sd1', 2), ('sd2', 0), ('sd2', 1),
                                            ('sd2_legacy', 0)])
def test_encoder_matches_transformers(tmp_path, name, clip_skip):
  te, tok = str(tmp_path / 'text_encoder'), str(tmp_path / 'tokenizer')
  cfg = random_clip.write_random_clip(te, tok, layers=3, heads=4, hidden_size=64,
                                      intermediate=128, seed=3, **CONFIGS[name])
  enc = clip.load_clip(te, clip_skip=clip_skip)
  captions = COMMON[:4] + ['', 'a ' * 100]
  ids = enc.tokenize(captions)
  ref_tok, _ = reference_tokenizer(tok)
  assert ids.tolist() == ref_tok(captions, padding='max_length', truncation=True,
                                 max_length=77).input_ids
  emb, mask, pooled = jax.jit(enc.encode)(enc.params, ids)
  ref_emb, ref_pooled = reference_outputs(te, ids, clip_skip)
  emb_diff = float(np.abs(np.asarray(emb) - ref_emb).max())
  pooled_diff = float(np.abs(np.asarray(pooled) - ref_pooled).max())
  print(f'{name} ({cfg["hidden_act"]}, eos_token_id={cfg["eos_token_id"]}, pad '
        f'{CONFIGS[name]["pad_token"]!r}), clip_skip={clip_skip}: max abs diff hidden '
        f'{emb_diff:.2e}, pooled {pooled_diff:.2e} (transformers {transformers.__version__})')
  assert emb_diff <= 1e-4 and pooled_diff <= 1e-4
  assert bool(np.asarray(mask).all()) and np.abs(ref_emb).max() > 0.5
