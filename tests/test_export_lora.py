"""Exporting a LoRA run (export/diffusers.py, models/lora_loading.py), without PyTorch: its adapters
as the LoRA file diffusers loads (every target layer under diffusers' name and shape, with the
rank and alpha), read back bit for bit; --merge as a pipeline whose U-Net is the base with the
adapters folded in; what cannot be exported or read is refused in one line."""
import filecmp
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import specs
from export import diffusers as export
from models import lora, lora_loading, sd_loading, weights
from models.sd_unet import SDUNet
from sampling import from_checkpoint
from tests import sd_runs
from tests.test_export_diffusers import _assert_bitwise, _export_cli, _saved_run
from text import clip
from tools import make_sd_pipeline

# The full tier: every test reads the shared LoRA run (2 steps of configs/sd.py:tiny, ~50 s on 2
# cores); the format on a network made in the test: tests/test_export_diffusers.py.
pytestmark = pytest.mark.full

TARGETS = sd_runs.LORA_TARGETS
RANK, ALPHA = 2, 4.0  # Scale 2.


@pytest.fixture(scope='module')
def run(sd_lora_run):
  """(pipeline, workdir): 2 steps of LoRA (rank 2, alpha 4) on every target of configs/sd.py:tiny,
  at a learning rate that moves the adapters well off zero: tests/conftest.py's `sd_lora_run`,
  shared with tests/test_sd_lora.py."""
  lora_config = sd_lora_run.config.model.lora
  assert (lora_config.rank, lora_config.alpha, lora_config.targets) == (RANK, ALPHA, TARGETS)
  return sd_lora_run.pipeline, sd_lora_run.workdir


@pytest.fixture(scope='module')
def restored(run):
  return from_checkpoint.restore(run[1], settings_of=specs.from_saved)


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """(folder, the record printed): the LoRA file export, by the command line."""
  out = str(tmp_path_factory.mktemp('lora_file') / 'lora')
  result = _export_cli(f'--workdir={run[1]}', f'--out={out}')
  assert result.returncode == 0, result.stderr
  assert (f'LoRA adapters, rank 2, alpha 4) to {out}/{lora_loading.FILE}: '
          f"pipe.load_lora_weights('{out}')") in result.stderr
  return out, json.loads(result.stdout)


def _read(folder):
  with safe_open(os.path.join(folder, lora_loading.FILE), 'np') as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _adapter_modules(tree, path=()):
  """{module path: {'lora_A', 'lora_B'}} of a nested dict."""
  if 'lora_A' in tree:
    return {path: tree}
  return {p: m for name, sub in tree.items() if isinstance(sub, dict)
          for p, m in _adapter_modules(sub, path + (name,)).items()}


def _at(tree, path):
  return functools.reduce(lambda node, key: node[key], path, tree)


def test_the_lora_file_holds_every_target_layer_as_diffusers_names_and_shapes_it(
    run, exported, restored):
  pipeline, workdir = run
  out, record = exported
  assert sorted(os.listdir(out)) == [export.RUN_RECORD, lora_loading.FILE]
  assert sorted(os.listdir(os.path.dirname(out))) == ['lora']  # No temporary folder left.
  tensors, metadata = _read(out)
  # Predicted from the base U-Net's own file: every Linear a target names, [r, in] and [out, r].
  unet, _ = weights.read_safetensors(os.path.join(pipeline, 'unet'), sd_loading.WEIGHTS)
  want, targets = {}, tuple('.' + t for t in TARGETS)
  for name, w in unet.items():
    module = name[:-len('.weight')]
    if name.endswith('.weight') and w.ndim == 2 and module.endswith(targets):
      want[f'unet.{module}.lora_A.weight'] = (RANK, w.shape[1])
      want[f'unet.{module}.lora_B.weight'] = (w.shape[0], RANK)
  assert {k: v.shape for k, v in tensors.items()} == want
  assert {k.split('.lora_')[0].split('.', 1)[1].split('transformer_blocks.0.')[-1]
          for k in want if k.startswith('unet.mid_block.')} == {
              f'attn{i}.{t}' for i in (1, 2) for t in TARGETS[:4]} | {'ff.net.0.proj', 'ff.net.2'}
  assert all(v.dtype == np.float32 for v in tensors.values())
  assert metadata['format'] == 'pt'
  assert json.loads(metadata[lora_loading.METADATA]) == {
      'unet.r': RANK, 'unet.lora_alpha': ALPHA, 'unet.target_modules': list(TARGETS)}
  # PyTorch's Linear layout of the multi-axis adapters: [heads, head_dim, r] and [r, 2, 4 dim].
  adapters = jax.device_get(restored.params['unet'])
  block = ('mid_block', 'attentions_0', 'transformer_blocks_0')
  a = _at(adapters, block + ('attn1', 'to_out_0', 'lora_A'))
  b = _at(adapters, block + ('ff', 'net_0_proj', 'lora_B'))
  assert a.ndim == 3 and b.ndim == 3
  prefix = 'unet.mid_block.attentions.0.transformer_blocks.0.'
  np.testing.assert_array_equal(tensors[prefix + 'attn1.to_out.0.lora_A.weight'],
                                a.reshape(-1, RANK).T)
  np.testing.assert_array_equal(tensors[prefix + 'ff.net.0.proj.lora_B.weight'],
                                b.reshape(RANK, -1).T)
  assert record['lora'] == {'rank': RANK, 'alpha': ALPHA, 'targets': list(TARGETS),
                            'merged': False, 'file': lora_loading.FILE}
  assert record['step'] == 2 and record['source'] == pipeline and 'text_encoder' not in record
  with open(os.path.join(out, export.RUN_RECORD)) as f:
    assert json.load(f) == {k: v for k, v in record.items() if k != 'out'}


def test_the_lora_file_reads_back_bit_for_bit(exported, restored):
  adapters, spec = lora_loading.read(exported[0], restored.settings.model.network)
  assert spec == lora.LoRASpec(rank=RANK, alpha=ALPHA, targets=TARGETS, dropout=0.0)
  _assert_bitwise(adapters, restored.params['unet'])
  # The file itself (not only its folder) reads the same.
  again, _ = lora_loading.read(os.path.join(exported[0], lora_loading.FILE),
                               restored.settings.model.network)
  _assert_bitwise(again, adapters)


def test_merge_folds_the_scaled_adapters_into_the_unet(run, exported, restored, tmp_path):
  pipeline, workdir = run
  out = str(tmp_path / 'merged')
  record = export.export_workdir(workdir, out, merge=True, lora_scale=0.5)
  assert record['lora'] == {'rank': RANK, 'alpha': ALPHA, 'targets': list(TARGETS),
                            'merged': True, 'scale': 0.5}
  assert record['text_encoder'] == 'copied'
  assert filecmp.cmp(os.path.join(pipeline, 'text_encoder', clip.WEIGHTS),
                     os.path.join(out, 'text_encoder', clip.WEIGHTS), shallow=False)
  assert os.path.isfile(os.path.join(out, 'model_index.json'))
  spec, got = sd_loading.load_sd_unet(os.path.join(out, 'unet'))
  # Computed here: W + 0.5 (alpha / r) A B, contracting A's [*in] rows with B's [*out] columns.
  base = jax.device_get(restored.frozen['unet'])
  modules = _adapter_modules(jax.device_get(restored.params['unet']))
  assert len(modules) == len(_read(exported[0])[0]) // 2
  for path, leaf in jax.tree_util.tree_leaves_with_path(got):
    keys = tuple(k.key for k in path)
    want = _at(base, keys)
    if keys[-1] == 'kernel' and keys[:-1] in modules:
      m = modules[keys[:-1]]
      want = want + 0.5 * ALPHA / RANK * np.tensordot(m['lora_A'], m['lora_B'], axes=1)
      np.testing.assert_allclose(leaf, want, rtol=0, atol=1e-6, err_msg=str(keys))
    else:
      np.testing.assert_array_equal(leaf, want, err_msg=str(keys))
  # In PyTorch's layout (the loader's own inverse): W' - W = 0.5 (alpha / r) lora_B @ lora_A.
  lora_file, _ = _read(exported[0])
  merged_w, _ = weights.read_safetensors(os.path.join(out, 'unet'), sd_loading.WEIGHTS)
  base_w, _ = weights.read_safetensors(os.path.join(pipeline, 'unet'), sd_loading.WEIGHTS)
  for key in (k for k in lora_file if k.endswith('.lora_A.weight')):
    name = key[len('unet.'):-len('.lora_A.weight')] + '.weight'
    delta = lora_file[key.replace('lora_A', 'lora_B')] @ lora_file[key]
    np.testing.assert_allclose(merged_w[name] - base_w[name], 0.5 * ALPHA / RANK * delta,
                               rtol=0, atol=1e-6, err_msg=name)
  # The merged U-Net computes what the adapters over the base compute at scale 0.5.
  r = np.random.RandomState(0)
  args = (jnp.asarray(r.randn(2, 8, 8, 4), jnp.float32), jnp.array([10.0, 700.0]),
          jnp.asarray(r.randn(2, 7, spec.cross_attention_dim), jnp.float32),
          jnp.ones((2, 7), bool), jnp.zeros((2, spec.cross_attention_dim)))
  apply = lambda net, p: np.asarray(jax.jit(functools.partial(net.apply, train=False))(
      {'params': p}, *args))
  merged = apply(SDUNet(spec), got)
  adapted = apply(SDUNet(restored.settings.model.network), restored.weights(0.5)['unet'])
  plain = apply(SDUNet(spec), base)
  assert np.abs(merged - adapted).max() <= 1e-5, np.abs(merged - adapted).max()
  assert np.abs(merged - plain).max() > 1e-3  # (The adapters do change the output.)


# ----------------------------------------------------------------------------- errors


def test_what_cannot_be_exported_is_refused_in_one_line(run, exported, tmp_path):
  pipeline, workdir = run
  record = specs.build(sd_runs.tiny_config(pipeline, str(tmp_path))).config_record()
  full = _saved_run(tmp_path / 'full_finetune', record)  # Refused before any weight is read.
  result = _export_cli(f'--workdir={full}', f'--out={tmp_path / "out"}', '--merge')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: --merge: {full} is not a LoRA run (model.lora.rank=0), so there are no adapters '
      'to merge: leave out --merge (its export is the whole fine-tuned pipeline).')
  with pytest.raises(export.ExportError, match=r'--lora_scale=0\.5 scales the adapters that '
                     r'--merge folds .* pass --merge too'):
    export.export_workdir(workdir, str(tmp_path / 'out'), lora_scale=0.5)
  assert not os.path.exists(tmp_path / 'out')
  # A LoRA file is not written into a folder that is not empty, unless --overwrite.
  out, _ = exported
  with pytest.raises(export.ExportError, match='exists and is not empty: pass --overwrite'):
    export.export_workdir(workdir, out)
  with open(os.path.join(out, 'stale.txt'), 'w') as f:
    f.write('x')
  export.export_workdir(workdir, out, overwrite=True)
  assert sorted(os.listdir(out)) == [export.RUN_RECORD, lora_loading.FILE]
  assert sorted(os.listdir(os.path.dirname(out))) == ['lora']


def _rewritten(folder, path, change):
  """folder's LoRA file with its tensors changed by `change(dict)`, written to `path`."""
  tensors, metadata = _read(folder)
  change(tensors)
  save_file(tensors, path, metadata=metadata)
  return path


def test_a_lora_file_that_does_not_fit_the_network_is_refused_naming_the_key(
    exported, restored, tmp_path):
  folder, network = exported[0], restored.settings.model.network
  q = 'unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q'

  def renamed(t):
    t[q.replace('to_q', 'to_x') + '.lora_A.weight'] = t.pop(q + '.lora_A.weight')
  with pytest.raises(ValueError, match=r"key 'unet\.mid_block.*attn1\.to_x\.lora_A\.weight' "
                     r'matches no layer of the network: it is not unet\.<module>\.lora_A'):
    lora_loading.read(_rewritten(folder, str(tmp_path / 'renamed.safetensors'), renamed), network)
  with pytest.raises(ValueError, match=r"\.to_q\.lora_B\.weight is missing: jaxdiff's LoRA adapts "
                     r"every 'to_q' layer"):
    lora_loading.read(_rewritten(folder, str(tmp_path / 'missing.safetensors'),
                                 lambda t: t.pop(q + '.lora_B.weight')), network)

  def text(t):
    t['text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight'] = np.zeros(
        (2, 32), np.float32)
  with pytest.raises(ValueError, match=r"key 'text_encoder\..*' matches no layer of the network: "
                     r"it is a text encoder's adapter"):
    lora_loading.read(_rewritten(folder, str(tmp_path / 'text.safetensors'), text), network)

  kohya = str(tmp_path / 'kohya.safetensors')
  save_file({'lora_unet_mid_block_attentions_0_proj_in.lora_down.weight': np.zeros((2, 32),
                                                                                    np.float32)},
            kohya)
  with pytest.raises(ValueError, match=r"^[^\n]*kohya.safetensors is a LoRA file in kohya's "
                     r"format \('lora_unet_mid_block_attentions_0_proj_in\.lora_down\.weight'\): "
                     r"only diffusers' peft format is read"):
    lora_loading.read(kohya, network)

  # Adapters of another base model (SD 2.x-like, other widths): the first key, with both shapes.
  sd2 = make_sd_pipeline.write_pipeline(str(tmp_path / 'sd2'), preset='sd2')
  other = sd_loading.read_spec(os.path.join(sd2, 'unet'))
  with pytest.raises(ValueError, match=r"'unet\.down_blocks\.0\.attentions\.0\.transformer_blocks"
                     r"\.0\.attn1\.to_k\.lora_A\.weight' has shape \(2, 32\), but this U-Net "
                     r'\(.*sd2/unet/config\.json\) needs \(2, 16\) \(rank 2\): the file adapts '
                     'another base model'):
    lora_loading.read(folder, other)
