"""U-Net building blocks against closed forms and a NumPy attention reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import layers
from models import attention
from models.attention import MultiHeadAttention, dot_product_attention


def test_sinusoidal_embedding_closed_form():
  t = np.array([0.0, 1.5, -30.0, 250.0], np.float32)
  dim, half = 8, 4
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(layers.sinusoidal_embedding(jnp.asarray(t), dim), expected,
                             rtol=1e-5, atol=1e-5)
  assert layers.sinusoidal_embedding(jnp.asarray(t), 7).shape == (4, 7)


def test_group_count_is_largest_divisor_not_above_request():
  assert layers.group_count(64, 32) == 32
  assert layers.group_count(48, 32) == 24
  assert layers.group_count(16, 32) == 16
  assert layers.group_count(7, 4) == 1


@pytest.mark.parametrize('shape, groups, dtype', [
    ((4, 16, 16, 64), 32, jnp.float32), ((2, 8, 8, 96), 24, jnp.float32),
    ((3, 10, 64), 8, jnp.float32), ((2, 8, 8, 128), 32, jnp.bfloat16)])
def test_group_norm_is_flax_group_norm_in_training_and_agrees_in_sampling(shape, groups, dtype):
  """layers.GroupNorm: flax's parameters; its loss and gradients are nn.GroupNorm's bit for bit
  (training is unchanged); its derivative-free form (sampling) agrees to float32 rounding."""
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), shape) + 1.0
  ours = layers.group_norm(shape[-1], groups, dtype, jnp.float32)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype, force_float32_reductions=True,
                     scale_init=layers.partitioned(nn.initializers.ones, ('norm',)),
                     bias_init=layers.partitioned(nn.initializers.zeros, ('norm',)))
  boxed = ours.init(jax.random.PRNGKey(1), x)
  layout = lambda tree: jax.tree.map(lambda b: (b.value.shape, b.names), tree,
                                     is_leaf=lambda b: isinstance(b, nn.Partitioned))
  assert layout(boxed) == layout(ref.init(jax.random.PRNGKey(1), x))
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape),
                        nn.unbox(boxed))
  loss = lambda m: jax.jit(jax.value_and_grad(
      lambda p, x: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32))), argnums=(0, 1)))
  (value, grads), (ref_value, ref_grads) = loss(ours)(params, x), loss(ref)(params, x)
  assert value == ref_value
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_array_equal(a, b)
  y, y_ref = jax.jit(ours.apply)(params, x), jax.jit(ref.apply)(params, x)
  assert y.dtype == y_ref.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol)
  with pytest.raises(ValueError, match='groups must divide'):
    layers.GroupNorm(7).init(jax.random.PRNGKey(0), x)


def test_resolve_dtype_rejects_unknown_names():
  assert layers.resolve_dtype('bfloat16', 'model.dtype') == jnp.bfloat16
  with pytest.raises(ValueError, match=r'model\.dtype'):
    layers.resolve_dtype('fp16', 'model.dtype')


def reference_attention(q, k, v, mask):
  """Per-example, per-head loop: softmax over the valid keys only; no valid key -> zeros."""
  b, lq, h, _ = q.shape
  out = np.zeros((b, lq, h, v.shape[-1]))
  for i in range(b):
    valid = np.flatnonzero(mask[i])
    if not len(valid):
      continue
    for j in range(h):
      logits = q[i, :, j] @ k[i, valid, j].T / np.sqrt(q.shape[-1])
      w = np.exp(logits - logits.max(axis=1, keepdims=True))
      w /= w.sum(axis=1, keepdims=True)
      out[i, :, j] = w @ v[i, valid, j]
  return out


def test_dot_product_attention_matches_reference_with_masks():
  r = np.random.RandomState(0)
  q, k, v = r.randn(3, 4, 2, 8), r.randn(3, 6, 2, 8), r.randn(3, 6, 2, 5)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  out = dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask))
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
  unmasked = dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  np.testing.assert_allclose(unmasked, reference_attention(q, k, v, np.ones_like(mask)),
                             rtol=1e-5, atol=1e-5)


def test_attention_in_cache_sized_chunks_matches_the_reference_and_its_gradients(monkeypatch):
  # A cache budget of 2 examples' scores: the batch of 6 (3 masked patterns, twice) runs as 3
  # strided chunks of 2 through lax.map.
  r = np.random.RandomState(1)
  q, k, v = r.randn(6, 4, 2, 8), r.randn(6, 6, 2, 8), r.randn(6, 6, 2, 5)
  mask = np.tile(np.array([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool),
                 (2, 1))
  per_example = 2 * 4 * 6 * 4  # heads x Lq x Lk x float32 bytes
  monkeypatch.setattr(attention, '_CPU_SCORES_BYTES', 2 * per_example)
  assert attention._cpu_chunk(6, per_example) == 2  # pylint: disable=protected-access
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
  chunked = jax.jit(lambda *a: dot_product_attention(*a, jnp.asarray(mask)))
  assert 'scan' in str(jax.make_jaxpr(chunked)(*args))  # lax.map really ran.
  np.testing.assert_allclose(chunked(*args), reference_attention(q, k, v, mask), rtol=1e-5,
                             atol=1e-5)
  # The deferred normalisation has the softmax's gradients (the unchunked closed form).
  def softmax_form(q, k, v):
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8)
    keep = jnp.asarray(mask)[:, None, None, :]
    probs = jnp.where(keep, jax.nn.softmax(jnp.where(keep, logits, -1e30), axis=-1), 0.0)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(*args)
  want = jax.jit(jax.grad(loss(softmax_form), argnums=(0, 1, 2)))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(got[0]))


def test_attention_chunks_keep_the_batch_split_over_the_mesh(monkeypatch):
  """Under a mesh the chunks are sized by each device's part of the batch and keep one slot per
  part, so every device attends only its own examples (a chunk of 1 example of 16 would make
  each of 8 devices compute all 16)."""
  from configs import base
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(1, 8, 1),
                           ('data', 'fsdp', 'tensor'))
  per_example = 2 * 32 * 32 * 4
  monkeypatch.setattr(attention, '_CPU_SCORES_BYTES', per_example // 2)  # 1 example a call.
  q = jnp.asarray(np.random.RandomState(0).randn(16, 32, 2, 8), jnp.float32)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  fn = jax.jit(lambda q: dot_product_attention(q, q, q), out_shardings=batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(base.get_config().mesh.logical_axis_rules):
    assert attention._batch_shards() == 8  # pylint: disable=protected-access
    jaxpr = str(jax.make_jaxpr(fn)(q))
    out = fn(jax.device_put(q, batch))
  # 2 chunks of 8 strided examples (one per device), not 16 chunks of 1.
  assert 'length=2' in jaxpr and 'f32[2,8,32,2,8]' in jaxpr
  np.testing.assert_allclose(out, reference_attention(q, q, q, np.ones((16, 32), bool)),
                             rtol=1e-5, atol=1e-5)
  assert attention._batch_shards() == 1  # pylint: disable=protected-access  (no mesh)


def test_attention_implementation_choice():
  q32, q16 = jnp.zeros((1, 4, 2, 32)), jnp.zeros((1, 4, 2, 32), jnp.bfloat16)
  # This machine is a CPU: 'auto' is the einsum form even in bfloat16; 'cudnn' only when asked.
  assert attention.attention_impl('auto', q16, masked=False) == 'xla'
  assert attention.attention_impl('auto', q32, masked=False) == 'xla'
  assert attention.attention_impl('cudnn', q16, masked=False) == 'cudnn'
  with pytest.raises(ValueError, match='model.attention'):
    attention.attention_impl('flash', q32, masked=False)
  with pytest.raises(ValueError, match='unmasked'):
    dot_product_attention(q16, q16, q16, jnp.ones((1, 4), bool), implementation='cudnn')


def test_multi_head_attention_kernel_axes_and_shapes():
  mha = MultiHeadAttention(num_heads=2, head_dim=4, q_axis='embed', kv_axis='text_embed')
  x, ctx = jnp.ones((1, 3, 6)), jnp.ones((1, 5, 10))
  variables = mha.init(jax.random.key(0), x, ctx, jnp.ones((1, 5), bool))
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['key']) == ('text_embed', 'heads', 'kv')
  assert nn.unbox(variables)['params']['key'].shape == (10, 2, 4)
  assert tuple(specs['out']) == ('heads', 'kv', 'embed')
  assert tuple(specs['out_bias']) == ('embed',)
  assert mha.apply(variables, x, ctx, jnp.ones((1, 5), bool)).shape == (1, 3, 6)


def test_resblock_skip_only_when_channels_change_and_film_uses_embedding():
  x, emb = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)), jnp.ones((2, 16))
  same = layers.ResBlock(8, norm_groups=4)
  wider = layers.ResBlock(12, norm_groups=4)
  init = lambda m: nn.unbox(jax.jit(lambda k: m.init(k, x, emb, False))(jax.random.key(1)))
  v_same, v_wider = init(same), init(wider)
  assert 'skip' not in v_same['params'] and v_wider['params']['skip']['kernel'].shape == (1, 1, 8, 12)
  assert jax.eval_shape(lambda v: wider.apply(v, x, emb, False), v_wider).shape == (2, 4, 4, 12)
  apply_same = jax.jit(lambda e: same.apply(v_same, x, e, False))
  out_a, out_b = apply_same(emb), apply_same(2 * emb)
  assert float(jnp.abs(out_a - out_b).max()) > 1e-4


def test_resampling_shapes():
  x = jnp.ones((1, 8, 8, 4))
  down, up = layers.Downsample(), layers.Upsample()
  assert down.apply(down.init(jax.random.key(0), x), x).shape == (1, 4, 4, 4)
  assert up.apply(up.init(jax.random.key(0), x), x).shape == (1, 16, 16, 4)


def test_upsample_is_nearest_neighbour_before_its_conv():
  x = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))
  identity = jnp.zeros((3, 3, 2, 2)).at[1, 1].set(jnp.eye(2))  # 3x3 conv that copies its input.
  params = {'params': {'conv': {'kernel': identity, 'bias': jnp.zeros(2)}}}
  out = layers.Upsample().apply(params, x)
  np.testing.assert_allclose(out, np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2))
