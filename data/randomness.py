"""Counter-based randomness on the host: the same uniforms for the same key on every machine.

The loader's epoch permutations and per-example draws, the Shapes scenes and the benchmark's
prompt order all key a Philox stream by a tuple of non-negative ints (a domain tag first), so
what they draw is a pure function of that tuple, never of the process, worker or order of calls.
"""
from typing import Sequence

import numpy as np


def uniforms(entropy: Sequence[int], n: int) -> np.ndarray:
  """n float64 uniforms in [0, 1) from the Philox bit stream keyed by `entropy` (non-negative ints)."""
  bits = np.random.Philox(np.random.SeedSequence(list(entropy))).random_raw(n)
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
