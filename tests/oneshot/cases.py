"""Small layers and calibration inputs for the one-shot tests (numpy, float32)."""

import numpy as np


def kernel(n_in, n_out, seed=0):
  return np.random.default_rng(seed).normal(size=(n_in, n_out)).astype(np.float32)


def correlated(n, n_in, seed=1, rank=8, noise=0.1):
  """Inputs from a low-rank mixture plus a little noise: strongly correlated features."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(rank, n_in))
  x = rng.normal(size=(n, rank)) @ mix + noise * rng.normal(size=(n, n_in))
  return x.astype(np.float32)


def outlier_channels(n, n_in, seed=2, channels=(3, 17, 40), factor=30.0):
  """Gaussian inputs whose few ``channels`` are ``factor`` times larger (LLM-style outliers)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, n_in))
  x[:, list(channels)] *= factor
  return x.astype(np.float32)


def salient_channels(n, n_in, seed=3, count=4, factor=20.0):
  """Inputs with a non-zero mean and ``count`` salient channels of large mean magnitude."""
  rng = np.random.default_rng(seed)
  x = rng.normal(loc=0.5, size=(n, n_in))
  idx = rng.choice(n_in, size=count, replace=False)
  x[:, idx] *= factor
  return x.astype(np.float32)
