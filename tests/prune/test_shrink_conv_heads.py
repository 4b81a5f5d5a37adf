"""Shrinking convolution chains and attention heads, against numpy float64 forwards."""

import jax
import numpy as np
import pytest

import jaxcompress as jc


def conv(x, kernel, bias, padding):
  """Naive NHWC convolution, stride 1 (numpy float64)."""
  kh, kw = kernel.shape[:2]
  if padding == "SAME":
    x = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  n, h, w, _ = x.shape
  out = np.zeros((n, h - kh + 1, w - kw + 1, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("nhwc,co->nhwo", x[:, i : i + out.shape[1], j : j + out.shape[2]], kernel[i, j])
  return out + bias


def relu(h):
  return np.maximum(h, 0.0)


def cnn_forward(p, x, padding):
  h = relu(conv(x, p["Conv_0"]["kernel"], p["Conv_0"]["bias"], padding))
  h = relu(conv(h, p["Conv_1"]["kernel"], p["Conv_1"]["bias"], padding))
  h = h.reshape(h.shape[0], -1)
  return h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


def cnn_params(padding):
  """Conv_0 (3x3, 2->6), Conv_1 (3x3, 6->5), Dense_0 on the flattened 5-channel map.

  Conv_0: channel 1 zero with a negative bias (relu -> 0: silent), channel 3 zero
  with a positive bias (a nonzero constant map). Conv_1: channel 2 zero with a
  positive bias (a constant folded into the Dense after flattening); channel 4's
  rows in the Dense are zero (contributes nothing).
  """
  rng = np.random.default_rng(0)
  side = 6 if padding == "SAME" else 8
  out_side = side if padding == "SAME" else side - 4
  k0, b0 = rng.normal(size=(3, 3, 2, 6)), rng.normal(size=6)
  k1, b1 = rng.normal(size=(3, 3, 6, 5)), rng.normal(size=5)
  kd, bd = rng.normal(size=(out_side * out_side * 5, 3)), rng.normal(size=3)
  k0[..., [1, 3]] = 0.0
  b0[1], b0[3] = -0.7, 0.9
  k1[..., 2] = 0.0
  b1[2] = 1.3
  kd.reshape(out_side * out_side, 5, 3)[:, 4, :] = 0.0
  p = {"Conv_0": {"kernel": k0, "bias": b0}, "Conv_1": {"kernel": k1, "bias": b1},
       "Dense_0": {"kernel": kd, "bias": bd}}
  x = rng.normal(size=(2, side, side, 2))
  return f32(p), x


def f32(params):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)


CHAIN = ["Conv_0", "Conv_1", "Dense_0"]


def as_numpy(params):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def test_valid_conv_chain_shrinks_exactly():
  p, x = cnn_params("VALID")
  small = jc.prune.shrink_chain(p, CHAIN, activation=jax.nn.relu, padding="VALID")
  assert small.features == (4, 3, 3)
  assert small.kept["Conv_0"].tolist() == [0, 2, 4, 5]
  assert small.kept["Conv_1"].tolist() == [0, 1, 3]
  assert small.inexact == {}
  np.testing.assert_allclose(cnn_forward(as_numpy(small.params), x, "VALID"),
                             cnn_forward(p, x, "VALID"), rtol=1e-5, atol=1e-5)


def test_same_padding_refuses_a_nonzero_constant_unless_allowed():
  p, x = cnn_params("SAME")
  with pytest.raises(ValueError, match=r"channels \[3\] of 'Conv_0'.*SAME-padded.*allow_border_error"):
    jc.prune.shrink_chain(p, CHAIN, activation=jax.nn.relu, padding="SAME")
  with pytest.raises(ValueError, match="pass padding='VALID' or 'SAME'"):
    jc.prune.shrink_chain(p, CHAIN, activation=jax.nn.relu)
  small = jc.prune.shrink_chain(p, CHAIN, activation=jax.nn.relu, padding="SAME",
                                allow_border_error=True)
  assert {k: v.tolist() for k, v in small.inexact.items()} == {"Conv_0": [3]}
  # Conv_1's outputs: equal in the interior, different at the borders.
  def conv1(params):
    h = relu(conv(x, params["Conv_0"]["kernel"], params["Conv_0"]["bias"], "SAME"))
    return conv(h, params["Conv_1"]["kernel"], params["Conv_1"]["bias"], "SAME")
  got = conv1(as_numpy(small.params))
  want = conv1(p)[..., small.kept["Conv_1"]]
  np.testing.assert_allclose(got[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(got[:, 0] - want[:, 0])) > 1e-3


def test_same_padding_is_exact_when_the_constant_is_zero():
  p, x = cnn_params("SAME")
  p["Conv_0"]["bias"][3] = -0.2  # relu(-0.2) = 0: the dead channel is silent
  small = jc.prune.shrink_chain(p, CHAIN, activation=jax.nn.relu, padding="SAME")
  assert small.inexact == {}
  np.testing.assert_allclose(cnn_forward(as_numpy(small.params), x, "SAME"),
                             cnn_forward(p, x, "SAME"), rtol=1e-5, atol=1e-5)


def mha(p, x, heads, layout):
  """numpy float64 causal multi-head attention."""
  def proj(name):
    k, b = p[name]["kernel"], p[name]["bias"]
    if layout == "dense":
      k, b = k.reshape(k.shape[0], heads, -1), b.reshape(heads, -1)
    return np.einsum("td,dhe->the", x, k) + b
  q, k, v = proj("query"), proj("key"), proj("value")
  s = np.einsum("the,she->hts", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((x.shape[0], x.shape[0]), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  z = np.einsum("hts,she->the", a, v)
  ok = p["out"]["kernel"]
  if layout == "dense":
    ok = ok.reshape(heads, -1, ok.shape[-1])
  return np.einsum("the,heo->to", z, ok) + p["out"]["bias"]


@pytest.mark.parametrize("layout", ["general", "dense"])
def test_heads_with_silent_values_or_outputs_are_removed_exactly(layout):
  rng = np.random.default_rng(1)
  d, heads, dh, t = 8, 4, 3, 5
  p = {n: {"kernel": rng.normal(size=(d, heads, dh)), "bias": rng.normal(size=(heads, dh))}
       for n in ("query", "key", "value")}
  p["out"] = {"kernel": rng.normal(size=(heads, dh, d)), "bias": rng.normal(size=d)}
  p["value"]["kernel"][:, 1] = 0.0  # head 1 outputs its value bias: folded into out's bias
  p["out"]["kernel"][2] = 0.0  # head 2 reaches nothing
  p["query"]["kernel"][:, 3] = 0.0  # head 3 attends uniformly: not removable
  if layout == "dense":
    for n in ("query", "key", "value"):
      p[n] = {"kernel": p[n]["kernel"].reshape(d, -1), "bias": p[n]["bias"].reshape(-1)}
    p["out"]["kernel"] = p["out"]["kernel"].reshape(-1, d)
  x = rng.normal(size=(t, d))
  p = f32(p)
  small = jc.prune.shrink_heads(p, q="query", k="key", v="value", o="out", num_heads=heads)
  assert small.features == (2,) and small.kept["heads"].tolist() == [0, 3]
  np.testing.assert_allclose(mha(as_numpy(small.params), x, 2, layout), mha(p, x, heads, layout),
                             rtol=1e-5, atol=1e-5)


def test_head_errors_name_the_problem():
  rng = np.random.default_rng(2)
  p = f32({n: {"kernel": rng.normal(size=(4, 6))} for n in ("q", "k", "v")})
  p["o"] = {"kernel": rng.normal(size=(6, 4)).astype(np.float32)}
  with pytest.raises(ValueError, match=r"'q/kernel' has shape \(4, 6\), which does not split into num_heads=4"):
    jc.prune.shrink_heads(p, q="q", k="k", v="v", o="o", num_heads=4)
  with pytest.raises(ValueError, match=r"keep drops heads \[0\]"):
    jc.prune.shrink_heads(p, q="q", k="k", v="v", o="o", num_heads=2, keep=np.array([False, True]))
  p["v"]["kernel"][:, :3] = 0.0
  p["v"]["bias"] = np.ones(6, np.float32)
  with pytest.raises(ValueError, match="'o' has no bias"):
    jc.prune.shrink_heads(p, q="q", k="k", v="v", o="o", num_heads=2)
