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
        (lambda: schedules.polynomial(0, 1, end_step=10, power=0), r"polynomial: power must be a number in \(0, inf\), got 0.0"),
        (lambda: schedules.linear(0, 1, begin_step=-1, end_step=3), r"begin_step must be an integer in \[0, inf\], got -1"),
        (lambda: schedules.cosine(float("nan"), 1, end_step=3), r"cosine: init_value must be a number .*got nan"),
        (lambda: schedules.piecewise([3], [0.5, float("nan")]), r"piecewise: values\[1\] must be a number"),
        (lambda: schedules.piecewise([3, 2], [0, 1, 2]), "strictly increase"),
        (lambda: schedules.piecewise([3], [0]), "len\\(boundaries\\) \\+ 1"),
        (lambda: schedules.as_schedule("0.5", name="sparsity"), "sparsity must be a number"),
    ],
)
def test_validation(build, match):
  with pytest.raises((ValueError, TypeError), match=match):
    build()


def test_library_schedules_know_their_range():
  assert schedules.constant(0.25).value_range == (0.25, 0.25)
  assert schedules.polynomial(0.9, 0.1, end_step=10).value_range == (0.1, 0.9)
  assert schedules.cosine(0.0, 0.8, end_step=10).value_range == (0.0, 0.8)
  assert schedules.piecewise([3, 6], [0.5, 0.2, 0.7]).value_range == (0.2, 0.7)


@pytest.mark.parametrize(
    "schedule, match",
    [
        (schedules.linear(0.0, 1.0, end_step=10), r"sparsity must stay in \[0, 1\), but its schedule ranges over \[0, 1\]"),
        (schedules.piecewise([5], [0.5, -0.1]), r"ranges over \[-0.1, 0.5\]"),
        (lambda step: jnp.asarray(step, jnp.float32) / 8.0, r"gives 1.0 at step 8\. Make the schedule stay in \[0, 1\)"),
        (lambda step: jnp.where(step >= 3, jnp.nan, 0.5), r"gives nan at step 3\."),
        (lambda step: jnp.zeros(2), r"giving a scalar for each step, got values of shape \(2,\)"),
    ],
)
def test_check_schedule_refuses_values_out_of_range(schedule, match):
  with pytest.raises((ValueError, TypeError), match=match):
    schedules.check_schedule("Prune", "sparsity", schedule, low=0.0, high=1.0, high_open=True, end_step=16)


def test_check_schedule_without_end_samples_far_steps():
  late = lambda step: jnp.where(step >= 100_000, 1.0, 0.5)
  schedules.check_schedule("Prune", "sparsity", late, low=0.0, high=1.0, high_open=True, end_step=50)
  with pytest.raises(ValueError, match=r"gives 1.0 at step 131072"):
    schedules.check_schedule("Prune", "sparsity", late, low=0.0, high=1.0, high_open=True)
