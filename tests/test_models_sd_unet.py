"""Stable Diffusion 1.x/2.x U-Net on random diffusers folders (tools/random_sd_unet.py): load, run.

Loading both presets, shapes/dtypes, conditioning on the timestep and the text (and not on the
mask or pooled vector), bf16, logical axes, remat, and every refusal (config keys, tensors,
files). Parity with diffusers' PyTorch model: tests/test_models_sd_unet_reference.py.
"""
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models import sd_blocks
from models.sd_loading import (WEIGHTS, abstract_params, abstract_variables, check_sample_side,
                               load_sd_unet)
from models.sd_unet import SDUNet, SDUNetSpec, spec_from_config
from tests.test_models_unet import AXES_VOCAB  # The native U-Net's logical axis names.
from tools.random_sd_unet import random_sd_unet_config, write_random_sd_unet

B, S, L = 2, 8, 5


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd_unet')
  return {p: write_random_sd_unet(str(root / p), preset=p) for p in ('sd1', 'sd2')}


@pytest.fixture(scope='module')
def loaded(folders):
  return {p: load_sd_unet(f) for p, f in folders.items()}


@functools.cache
def _jitted(spec):
  return jax.jit(lambda params, *a: SDUNet(spec).apply({'params': params}, *a, train=False))


def run(spec, params, *args):
  return _jitted(spec)(params, *args)


def inputs(spec, seed=0):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(B, S, S, spec.in_channels), jnp.float32)
  t = jnp.asarray([3.0, 871.5], jnp.float32)  # diffusers timesteps (fractional allowed).
  context = jnp.asarray(r.randn(B, L, spec.cross_attention_dim), jnp.float32)
  mask = jnp.asarray([[True] * L, [True, True, False, False, False]])
  pooled = jnp.asarray(r.randn(B, 7), jnp.float32)
  return x, t, context, mask, pooled


@pytest.mark.parametrize('preset', ['sd1', 'sd2'])
def test_loads_diffusers_layout_and_conditions_on_timestep_and_text(loaded, folders, preset):
  spec, params = loaded[preset]
  tensors = load_file(os.path.join(folders[preset], WEIGHTS))
  # The layouts: OIHW -> HWIO, (out, in) -> (in, heads, head_dim), GEGLU (value, gate) halves.
  np.testing.assert_array_equal(params['conv_in']['kernel'],
                                tensors['conv_in.weight'].transpose(2, 3, 1, 0))
  p = 'down_blocks.0.attentions.0.transformer_blocks.0'
  heads, hd = spec.level_heads(0)
  block = params['down_blocks_0']['attentions_0']['transformer_blocks_0']
  np.testing.assert_array_equal(block['attn2']['to_k']['kernel'],
                                tensors[f'{p}.attn2.to_k.weight'].T.reshape(-1, heads, hd))
  gate = tensors[f'{p}.ff.net.0.proj.weight'][4 * heads * hd:]
  np.testing.assert_array_equal(block['ff']['net_0_proj']['kernel'][:, 1], gate.T)

  x, t, context, mask, pooled = inputs(spec)
  out = run(spec, params, x, t, context, mask, pooled)
  assert out.shape == (B, S, S, spec.out_channels) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0.1
  later = run(spec, params, x, t + 50.0, context, mask, pooled)
  assert float(jnp.abs(later - out).max()) > 1e-3  # The timestep conditions.
  other = run(spec, params, x, t, inputs(spec, seed=1)[2], mask, pooled)
  assert float(jnp.abs(other - out).max()) > 1e-3  # Cross-attention reaches the text.
  # The mask and pooled vector are ignored (SD attends to every token).
  same = run(spec, params, x, t, context, jnp.ones_like(mask), 3.0 * pooled)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(out))


def test_sharded_folder_loads_the_same_params(loaded, tmp_path):
  folder = write_random_sd_unet(str(tmp_path / 'sharded'), preset='sd1', shards=3)
  assert not os.path.exists(os.path.join(folder, WEIGHTS))
  sharded = load_sd_unet(folder)
  assert sharded.spec == loaded['sd1'].spec
  jax.tree.map(np.testing.assert_array_equal, sharded.params, loaded['sd1'].params)
  assert sharded.fingerprint.split(':')[-1] == loaded['sd1'].fingerprint.split(':')[-1]
  changed = jax.tree.map(lambda v: v + 1.0, sharded.params)
  assert sharded._replace(params=changed).fingerprint != sharded.fingerprint
  os.remove(os.path.join(folder, 'diffusion_pytorch_model-00002-of-00003.safetensors'))
  with pytest.raises(FileNotFoundError, match=r'00002-of-00003\.safetensors not found.*index'):
    load_sd_unet(folder)


@pytest.mark.full  # Compiles the U-Net a second time, in bf16 (as the native U-Net's test).
def test_bfloat16_compute_keeps_float32_params_and_stays_close(folders, loaded):
  spec, params = load_sd_unet(folders['sd1'], dtype='bfloat16')
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  args = inputs(spec)
  out = run(spec, params, *args)
  ref = run(*loaded['sd1'], *args)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 0 < err < 0.05, err  # Really computed in bf16, yet close to float32.


def test_remat_policies_reach_the_blocks(loaded):
  spec, params = loaded['sd1']
  args = inputs(spec)
  jaxprs = {r: str(jax.make_jaxpr(lambda p, r=r: SDUNet(spec.replace(remat=r)).apply(
      {'params': p}, *args, train=True))(params)) for r in ('none', 'dots', 'full')}
  assert 'remat' not in jaxprs['none'] and 'checkpoint' not in jaxprs['none']
  assert 'policy=DotsSaveable(only_if_no_batch_dims=True)' in jaxprs['dots']
  assert 'policy=<function nothing_saveable' in jaxprs['full']


@pytest.mark.full  # Compiles the U-Net a second time, with remat.
def test_remat_keeps_the_output(loaded):
  spec, params = loaded['sd1']
  args = inputs(spec)
  full = run(spec.replace(remat='full'), params, *args)
  np.testing.assert_allclose(full, run(spec, params, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('preset', ['sd1', 'sd2'])
def test_every_param_has_logical_axes_of_its_rank(loaded, preset):
  spec = loaded[preset].spec
  boxed = {'params': abstract_variables(spec)}  # jax.eval_shape of SDUNet(spec).init.
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim and set(box.names) <= AXES_VOCAB, box.names
  specs = nn.get_partition_spec(boxed)['params']
  block = specs['down_blocks_0']['attentions_0']['transformer_blocks_0']
  assert tuple(block['attn1']['to_q']['kernel']) == ('embed', 'heads', 'kv')
  assert tuple(block['attn2']['to_k']['kernel']) == ('text_embed', 'heads', 'kv')
  assert tuple(block['attn2']['to_out_0']['kernel']) == ('heads', 'kv', 'embed')
  assert tuple(block['ff']['net_0_proj']['kernel']) == ('embed', None, 'mlp')
  assert tuple(specs['down_blocks_0']['resnets_0']['conv1']['kernel']) == (
      None, None, 'conv_in', 'conv_out')
  proj_in = specs['down_blocks_0']['attentions_0']['proj_in']['kernel']
  assert tuple(proj_in)[-2:] == ('conv_in', 'conv_out')
  assert len(tuple(proj_in)) == (2 if spec.use_linear_projection else 4)
  shapes = jax.tree.map(lambda v: v.shape, nn.unbox(boxed)['params'])
  assert shapes == jax.tree.map(lambda v: v.shape, loaded[preset].params)


def test_timestep_embedding_is_diffusers_formula():
  t = jnp.asarray([0.0, 1.0, 999.0])
  for flip, shift in ((True, 0), (False, 1)):
    emb = np.asarray(sd_blocks.timestep_embedding(t, 7, flip, shift))
    freqs = np.exp(-np.log(10000.0) * np.arange(3) / (3 - shift))
    args = np.asarray(t)[:, None] * freqs
    halves = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
    want = np.concatenate(halves + [np.zeros((3, 1))], axis=-1)  # Odd width: a zero column.
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-5)


def test_heads_come_from_attention_head_dim_unless_num_attention_heads_is_set():
  spec = SDUNetSpec(block_out_channels=(32, 64), attention_head_dim=(2, 4),
                    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), norm_num_groups=8)
  assert spec.level_heads(0) == (2, 16) and spec.level_heads(1) == (4, 16)
  assert spec.replace(num_attention_heads=8).level_heads(1) == (8, 8)


def test_sample_side_must_divide_down_the_levels(loaded):
  spec = loaded['sd2'].spec  # Two downsamplers: multiples of 4.
  check_sample_side(spec, 12, 'data.latent_size')
  for bad in (6, 0, -4, True, 8.0):
    with pytest.raises(ValueError, match=r'data\.latent_size='):
      check_sample_side(spec, bad, 'data.latent_size')
  x, t, context, mask, pooled = inputs(spec)
  with pytest.raises(ValueError, match='divisible by 4'):
    jax.eval_shape(lambda p: SDUNet(spec).apply({'params': p}, x[:, :6, :6], t, context, mask,
                                                pooled, train=False), loaded['sd2'].params)
  with pytest.raises(ValueError, match='cross_attention_dim=24'):
    jax.eval_shape(lambda p: SDUNet(spec).apply({'params': p}, x, t, context[..., :8], mask,
                                                pooled, train=False), loaded['sd2'].params)


# ----------------------------------------------------------------------------- refusals

REFUSED = [
    ('addition_embed_type', 'text_time'), ('addition_time_embed_dim', 256),
    ('class_embed_type', 'timestep'), ('num_class_embeds', 10),
    ('projection_class_embeddings_input_dim', 2816), ('encoder_hid_dim', 768),
    ('encoder_hid_dim_type', 'text_proj'), ('time_cond_proj_dim', 256),
    ('dual_cross_attention', True), ('only_cross_attention', True),
    ('only_cross_attention', [False, True]), ('use_linear_projection', [True, False]),
    ('resnet_time_scale_shift', 'scale_shift'), ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'),
    ('mid_block_type', None), ('down_block_types', ['CrossAttnDownBlock2D', 'AttnDownBlock2D']),
    ('up_block_types', ['SimpleCrossAttnUpBlock2D', 'CrossAttnUpBlock2D']),
    ('attention_type', 'gated'), ('reverse_transformer_layers_per_block', [[1], [1]]),
    ('transformer_layers_per_block', [[1], [1]]), ('conv_in_kernel', 1), ('conv_out_kernel', 1),
    ('time_embedding_type', 'fourier'), ('cross_attention_norm', 'group_norm'),
    ('center_input_sample', True), ('downsample_padding', 0), ('mid_block_scale_factor', 2),
    ('dropout', 0.1), ('act_fn', 'gelu'), ('norm_num_groups', None), ('layers_per_block', [1, 2]),
    ('attention_head_dim', [8]), ('time_embedding_act_fn', 'silu'), ('some_new_key', 1),
    ('_class_name', 'UNet2DModel'),
]


@pytest.mark.parametrize('key, value', REFUSED, ids=[f'{k}={v}' for k, v in REFUSED])
def test_unsupported_config_keys_are_refused_naming_key_and_file(key, value):
  cfg = random_sd_unet_config('sd1', **{key: value})
  with pytest.raises(ValueError, match=rf'/x/unet/config\.json: .*{key}'):
    spec_from_config(cfg, '/x/unet/config.json')


def test_harmless_keys_are_accepted():
  cfg = random_sd_unet_config('sd1', center_input_sample=False, downsample_padding=1,
                              mid_block_scale_factor=1.0, dropout=0,
                              only_cross_attention=[False] * 2,
                              use_linear_projection=[True, True], layers_per_block=[1, 1],
                              resnet_skip_time_act=True, _name_or_path='x')
  spec = spec_from_config(cfg, 'config.json', dtype='bfloat16', remat='dots')
  assert spec.use_linear_projection is True and spec.layers_per_block == 1
  assert spec.remat == 'dots' and spec == spec_from_config(cfg, 'other.json', dtype='bfloat16',
                                                           remat='dots')
  hash(spec)


def _copy(folder, tmp_path, name='copy'):
  return shutil.copytree(folder, str(tmp_path / name))


def test_config_refusal_names_the_folder_file(folders, tmp_path):
  folder = _copy(folders['sd1'], tmp_path)
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    cfg = json.load(f)
  with open(path, 'w') as f:
    json.dump({**cfg, 'addition_embed_type': 'text_time'}, f)
  with pytest.raises(ValueError,
                     match=rf"{path}: addition_embed_type='text_time' is not supported"):
    load_sd_unet(folder)


def _rewrite(folder, change):
  path = os.path.join(folder, WEIGHTS)
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path)


def test_tensor_refusals_name_the_tensor(folders, tmp_path):
  name = 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight'
  bad_shape = _copy(folders['sd1'], tmp_path, 'shape')
  _rewrite(bad_shape, lambda t: t.update({name: np.zeros((32, 16), np.float32)}))
  with pytest.raises(ValueError, match=rf"'{name}' has shape \(32, 16\) but config.json implies "
                                       r'\(32, 32\)'):
    load_sd_unet(bad_shape)
  missing = _copy(folders['sd1'], tmp_path, 'missing')
  _rewrite(missing, lambda t: t.pop(name))
  with pytest.raises(ValueError, match=rf"tensor '{name}' is missing"):
    load_sd_unet(missing)
  extra = _copy(folders['sd1'], tmp_path, 'extra')
  _rewrite(extra, lambda t: t.update({'add_embedding.linear_1.weight': np.zeros((2, 2),
                                                                                 np.float32)}))
  with pytest.raises(ValueError,
                     match=r"1 tensors are not used .*'add_embedding\.linear_1\.weight'"):
    load_sd_unet(extra)


def test_file_refusals(folders, tmp_path):
  with pytest.raises(FileNotFoundError, match='not found'):
    load_sd_unet(str(tmp_path / 'nowhere'))
  pipeline = tmp_path / 'pipeline'
  _copy(folders['sd1'], pipeline, 'unet')
  with pytest.raises(FileNotFoundError, match=r'config\.json not found \(a pipeline folder: point '
                                              r'at .*unet'):
    load_sd_unet(str(pipeline))
  for pickle in ('diffusion_pytorch_model.bin', 'model.ckpt'):
    folder = _copy(folders['sd1'], tmp_path, pickle)
    os.remove(os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, pickle), 'wb') as f:
      f.write(b'not to be unpickled')
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS} not found.*'{pickle}'.*never opened"
                                                r'.*safe_serialization=True'):
      load_sd_unet(folder)
  no_config = _copy(folders['sd1'], tmp_path, 'no_config')
  os.remove(os.path.join(no_config, 'config.json'))
  with pytest.raises(FileNotFoundError, match=r'no_config/config\.json not found'):
    load_sd_unet(no_config)


def test_abstract_params_need_no_weights(loaded):
  spec = loaded['sd2'].spec
  shapes = jax.tree.map(lambda v: (v.shape, v.dtype), abstract_params(spec))
  assert shapes == jax.tree.map(lambda v: (v.shape, v.dtype), loaded['sd2'].params)
