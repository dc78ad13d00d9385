"""Minimal repros of where XLA:CPU spends our train step: single layers, JAX vs PyTorch.

  python -m benchmarks.ops --batch=32 --threads=2 --rounds=7

Each case is one layer's forward + backward (the gradient of sum(y^2) with respect to the input
and the weights), at the shapes of configs/base.py's U-Net at 32 px and batch 32: a 3x3
convolution at each level, the same convolution's three parts (forward only, input gradient,
kernel gradient), a GroupNorm, and a self-attention over a 16 x 16 image. JAX runs each as one
jitted function; PyTorch (an optional peer: torch is never a product dependency) runs it eagerly.
A and B alternate in every round; the table gives the median time of each and the median and
range of the per-round ratio JAX / PyTorch. BENCHMARKS.md (issue 17) has the figures.
"""

import argparse
import os
import time

import numpy as np


def _conv_cases(batch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn)
  cases = []
  for size, ch in ((32, 64), (16, 128), (8, 128)):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, ch), np.float32)
    w = rng.standard_normal((3, 3, ch, ch), np.float32) * 0.05
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    wt = torch.tensor(w).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
    name = f'conv3x3 {size}px {ch}ch'
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    fwd = jax.jit(conv)
    dy = jnp.ones_like(xj)
    dyt = torch.ones_like(xt)

    def t_grad(xt=xt, wt=wt):
      xt.grad = wt.grad = None
      (torch.nn.functional.conv2d(xt, wt, padding=1) ** 2).sum().backward()

    def t_fwd(xt=xt, wt=wt):
      with torch.no_grad():
        torch.nn.functional.conv2d(xt, wt, padding=1)

    def t_dx(xt=xt, wt=wt, dyt=dyt):
      torch.ops.aten.convolution_backward(dyt, xt, wt, None, (1, 1), (1, 1), (1, 1), False,
                                          (0, 0), 1, (True, False, False))

    def t_dw(xt=xt, wt=wt, dyt=dyt):
      torch.ops.aten.convolution_backward(dyt, xt, wt, None, (1, 1), (1, 1), (1, 1), False,
                                          (0, 0), 1, (False, True, False))

    cases += [
        (name + ' fwd+bwd', lambda g=grad, a=xj, b=wj: jax.block_until_ready(g(a, b)), t_grad),
        (name + ' forward', lambda f=fwd, a=xj, b=wj: jax.block_until_ready(f(a, b)), t_fwd),
        (name + ' input grad', lambda f=dx, a=xj, b=wj, c=dy: jax.block_until_ready(f(a, b, c)),
         t_dx),
        (name + ' kernel grad', lambda f=dw, a=xj, b=wj, c=dy: jax.block_until_ready(f(a, b, c)),
         t_dw)]
  return cases


def _norm_and_attention_cases(batch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from models import attention, layers  # pylint: disable=g-import-not-at-top
  cases = []
  rng = np.random.default_rng(0)
  for size, ch in ((32, 64), (16, 128)):
    x = rng.standard_normal((batch, size, size, ch), np.float32)
    norm = layers.group_norm(ch, 32, jnp.float32, jnp.float32)
    params = norm.init(jax.random.PRNGKey(0), jnp.asarray(x))
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(norm.apply(p, x) ** 2), argnums=(0, 1)))
    xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    gn = torch.nn.GroupNorm(32, ch)

    def t_gn(xt=xt, gn=gn):
      xt.grad = None
      gn.zero_grad()
      (gn(xt) ** 2).sum().backward()

    cases.append((f'groupnorm {size}px {ch}ch fwd+bwd',
                  lambda g=grad, p=params, a=jnp.asarray(x): jax.block_until_ready(g(p, a)), t_gn))
  for heads, dim in ((4, 32), (32, 4)):
    q = rng.standard_normal((batch, 256, heads, dim), np.float32)
    qj = jnp.asarray(q)
    qt = torch.tensor(q).permute(0, 2, 1, 3).contiguous().requires_grad_(True)
    grad = jax.jit(jax.grad(
        lambda q: jnp.sum(attention.dot_product_attention(q, q, q) ** 2)))

    def t_attn(qt=qt):
      qt.grad = None
      (torch.nn.functional.scaled_dot_product_attention(qt, qt, qt) ** 2).sum().backward()

    cases.append((f'self-attention 16x16 px, {heads} heads of {dim} fwd+bwd',
                  lambda g=grad, a=qj: jax.block_until_ready(g(a)), t_attn))
  return cases


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--threads', type=int, default=0, help="torch's threads (0: every core).")
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--only', default='', help='Run the cases whose name contains this.')
  p.add_argument('--pause', type=float, default=0.2, help='Seconds between A and B.')
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads or os.cpu_count())
  cases = _conv_cases(args.batch) + _norm_and_attention_cases(args.batch)
  print(f'batch {args.batch}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}')
  print('| case | JAX ms | PyTorch ms | JAX / PyTorch (min-max) |\n|---|---|---|---|')
  for name, a, b in cases:
    if args.only not in name:
      continue
    a(), b(), a(), b()  # Compile and warm up.
    ta, tb = [], []
    for _ in range(args.rounds):
      for fn, out in ((a, ta), (b, tb)):
        time.sleep(args.pause)  # The other side's idle threads stop spinning first.
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    r = np.asarray(ta) / np.asarray(tb)
    print(f'| {name} | {np.median(ta) * 1e3:.1f} | {np.median(tb) * 1e3:.1f} | '
          f'{np.median(r):.2f} ({r.min():.2f}-{r.max():.2f}) |', flush=True)


if __name__ == '__main__':
  main()
