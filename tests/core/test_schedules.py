import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core import schedules


def test_polynomial_is_zhu_gupta_cubic():
  s = schedules.polynomial(0.1, 0.9, begin_step=10, end_step=110)
  for t in [0, 10, 35, 60, 109, 110, 500]:
    frac = min(max((t - 10) / 100, 0.0), 1.0)
    expected = 0.9 + (0.1 - 0.9) * (1 - frac) ** 3
    np.testing.assert_allclose(float(s(t)), expected, rtol=1e-6)


def test_linear_cosine_constant():
  lin = schedules.linear(1.0, 3.0, begin_step=2, end_step=6)
  np.testing.assert_allclose([float(lin(t)) for t in (0, 2, 4, 6, 9)], [1, 1, 2, 3, 3], rtol=1e-6)
  cos = schedules.cosine(1.0, 0.0, end_step=8)
  expected = [0.5 * (1 + np.cos(np.pi * min(t, 8) / 8)) for t in range(10)]
  np.testing.assert_allclose([float(cos(t)) for t in range(10)], expected, atol=1e-6)
  assert float(schedules.constant(0.25)(7)) == 0.25


def test_piecewise():
  s = schedules.piecewise([5, 10], [0.0, 0.5, 0.75])
  assert [float(s(t)) for t in (0, 4, 5, 9, 10, 100)] == [0.0, 0.0, 0.5, 0.5, 0.75, 0.75]


def test_schedules_trace_once():
  traces = []
  s = schedules.polynomial(0.0, 0.9, end_step=100)

  @jax.jit
  def f(step):
    traces.append(1)
    return s(step)

  for t in range(5):
    f(jnp.int32(t))
  assert len(traces) == 1


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: schedules.polynomial(0, 1, begin_step=5, end_step=5), "greater than begin_step"),
        (lambda: schedules.polynomial(0, 1, end_step=10, power=0), "power must be positive"),
        (lambda: schedules.linear(0, 1, begin_step=-1, end_step=3), "non-negative int"),
        (lambda: schedules.piecewise([3, 2], [0, 1, 2]), "strictly increase"),
        (lambda: schedules.piecewise([3], [0]), "len\\(boundaries\\) \\+ 1"),
        (lambda: schedules.as_schedule("0.5", name="sparsity"), "sparsity must be a number"),
    ],
)
def test_validation(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()
