"""Allocator: exact projection, equal to multi-start SLSQP on random problems, infeasible inputs refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2dino_jax.errors import SolverError
from m2dino_jax.scaling import allocate, reference, simulate
from m2dino_jax.scaling.law import Law, predict_loss


def test_projection_is_exact():
  rng = np.random.default_rng(0)
  n, m = 6, 400
  lower = rng.uniform(0, 0.12, (m, n)) * (rng.uniform(size=(m, n)) < 0.7)
  upper = np.minimum(lower + rng.uniform(0.05, 0.9, (m, n)), 1.0)
  upper[:, 0] = 1.0  # keep sum(upper) >= 1 >= sum(lower)
  v = rng.normal(0, 0.6, (m, n))
  v[:10] = rng.uniform(0, 1, (10, n))  # a few points already near the set
  with jax.enable_x64(True):
    got = np.asarray(jax.jit(jax.vmap(allocate.project))(jnp.asarray(v), jnp.asarray(lower),
                                                         jnp.asarray(upper)))
  for k in range(m):
    ref = reference.project_reference(v[k], lower[k], upper[k], 1.0)
    np.testing.assert_allclose(got[k], ref, rtol=0, atol=1e-12)
  assert np.abs(got.sum(1) - 1).max() < 1e-14
  assert (got >= lower).all() and (got <= upper).all()
  # A point of the set projects to itself; the projection is the nearest point (checked against others).
  with jax.enable_x64(True):
    again = np.asarray(jax.vmap(allocate.project)(jnp.asarray(got), jnp.asarray(lower), jnp.asarray(upper)))
  np.testing.assert_allclose(again, got, atol=1e-14)


def _random_problems(rng, count, n):
  return allocate.random_problems(rng, count, n)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_matches_slsqp_on_random_problems(n):
  """40 problems per size, 120 in all: objective no worse than SLSQP's by 1e-6 relative, constraints 1e-9."""
  rng = np.random.default_rng(n)
  problems = _random_problems(rng, 40, n)
  stack = lambda xs: jnp.asarray(np.array(xs))
  with jax.enable_x64(True):
    laws = Law(*(stack([np.asarray(p[0][f]) for p in problems]) for f in range(5)))
    batch = allocate.Problem(laws, stack([p[1] for p in problems]), stack([p[2] for p in problems]),
                             stack([p[3] for p in problems]), stack([p[4] for p in problems]))
    sol = jax.tree.map(np.asarray, allocate.solve_batch(batch, allocate.DEFAULT_TOL))
  assert sol.converged.all() and (sol.pg_norm <= allocate.DEFAULT_TOL).all()
  for k, (law, budget, lower, upper, w) in enumerate(problems):
    z = sol.fractions[k]
    assert abs(z.sum() - 1.0) <= 1e-9 and (z >= lower - 1e-9).all() and (z <= upper + 1e-9).all()
    x_ref, f_ref = reference.allocate_slsqp(law, budget, lower * budget, upper * budget, w, starts=3, seed=k)
    f_ours = float(np.sum(w * predict_loss(law, z * budget, xp=np)))
    assert f_ours == pytest.approx(float(sol.objective[k]), rel=1e-12)
    assert f_ours <= f_ref * (1 + 1e-6), (k, f_ours, f_ref)
    assert f_ours >= f_ref * (1 - 1e-6), (k, f_ours, f_ref)  # SLSQP is not worse either: same optimum


def test_budgets_vmapped_equal_one_by_one_and_relative_option():
  law, available = simulate.planted_law()
  budgets = [3e4, 1e5, 5e5, 1.5e6]
  many = allocate.allocate(law, budgets, available, floor=0.05)
  for k, b in enumerate(budgets):
    one = allocate.allocate(law, [b], available, floor=0.05)
    np.testing.assert_allclose(many["fractions"][k], one["fractions"][0], atol=1e-9)
    assert many["converged"][k]
    prop = available / available.sum() * b
    np.testing.assert_allclose(many["proportional_counts"][k], prop)
    assert many["objective"][k] <= many["proportional_objective"][k] + 1e-12
  np.testing.assert_allclose(many["counts"].sum(1), budgets, rtol=1e-12)
  rel = allocate.allocate(law, budgets, available, floor=0.05, relative=True)
  np.testing.assert_allclose(rel["proportional_objective"], 3.0)  # each relative loss is 1 there
  np.testing.assert_allclose(rel["weights"] * rel["proportional_losses"], 1.0)


def test_hand_gradient_equals_autodiff():
  rng = np.random.default_rng(3)
  law = simulate.random_law(5, rng)._replace(gamma=rng.uniform(0.6, 1.3, (5, 5)))
  problem = allocate.Problem(law, 2e5, np.full(5, 0.02), np.ones(5), rng.uniform(0.5, 2, 5))
  with jax.enable_x64(True):
    problem = jax.tree.map(jnp.asarray, problem)
    for z in rng.dirichlet(np.ones(5), size=5):
      value, grad = allocate.objective_and_grad(problem, jnp.asarray(z))
      ref_value, ref_grad = jax.value_and_grad(lambda z_: allocate.objective(problem, z_))(jnp.asarray(z))
      np.testing.assert_allclose(value, ref_value, rtol=1e-13)
      np.testing.assert_allclose(grad, ref_grad, rtol=1e-10)


@pytest.mark.parametrize("budget, available, floor, message", [
    (1e5, [1e6, 1e6, 1e6], 0.4, "floors alone exceed the budget"),
    (1e5, [1e6, 3e3, 1e6], 0.05, "data available in ['b'] is below the floor"),
    (5e6, [1e6, 1e6, 1e6], 0.05, "budget 5e+06 exceeds the total data available 3e+06"),
    (-1.0, [1e6, 1e6, 1e6], 0.05, "budget must be a positive number"),
])
def test_infeasible_inputs_raise(budget, available, floor, message):
  law, _ = simulate.planted_law()
  with pytest.raises(SolverError, match="infeasible|positive") as err:
    allocate.allocate(law, [budget], available, floor=floor, names=["a", "b", "c"])
  assert message in str(err.value)
