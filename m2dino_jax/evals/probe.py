"""Classification probes on frozen features: weighted k-NN and the linear probe (macro F1 headline).

k-NN (DINO's `eval_knn`): rows L2-normalised, the k nearest training rows by cosine similarity vote with
weight exp(similarity / T) (T = 0.07); class probabilities are the normalised votes. The same classifier as
scikit-learn's KNeighborsClassifier(metric='cosine', algorithm='brute', weights=lambda d: exp((1 - d) / T)).

Linear probe: features standardised with the training mean / std (zero-variance columns kept as they are),
then multinomial logistic regression with an L2 penalty on the weights (not the bias), minimising
    mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C n)
i.e. scikit-learn's LogisticRegression(C) objective (C * sum CE + ||W||^2 / 2) divided by C n; solved by
L-BFGS (optax) to a gradient-norm tolerance, for every C of a grid at once (vmap). C is chosen by macro F1 on
a validation split (given, or a stratified 20 % of the training rows), then the probe is refitted on train +
validation and scored on the test split. UltraDINO sweeps 13 SGD learning rates for 10 epochs instead (DINOv2's
linear.py); a converged logistic regression with a C sweep is the deterministic analogue.
Metrics: tasks.metrics.classification_scores (AUC, accuracy, macro / weighted F1, MCC).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2dino_jax.tasks import metrics

DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 2, 11))
KNN_TEMPERATURE = 0.07


def _stats(train: np.ndarray):
  mean, std = train.mean(axis=0), train.std(axis=0)
  return mean, np.where(std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0), 1.0, std)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """(x - mean) / std with the training statistics (as sklearn's StandardScaler: ddof 0, std 0 -> 1)."""
  mean, std = _stats(train)
  return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


# ------------------------------------------------------------------------------------------------ k-NN


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes(train, train_y, test, *, k: int, num_classes: int, temperature: float):
  sims = test @ train.T
  top, idx = jax.lax.top_k(sims, k)
  w = jnp.exp(top / temperature)
  votes = jnp.einsum("nk,nkc->nc", w, jax.nn.one_hot(train_y[idx], num_classes))
  return votes / jnp.sum(votes, axis=-1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_probs(train_x, train_y, test_x, num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE,
              chunk: int = 1024) -> np.ndarray:
  """Class probabilities [N_test, C] of the weighted cosine k-NN vote (test rows in fixed-size chunks)."""
  train, test = jnp.asarray(_unit(train_x)), _unit(test_x)
  y = jnp.asarray(np.asarray(train_y, np.int32))
  k = min(int(k), train.shape[0])
  chunk = min(chunk, len(test))
  out = []
  for start in range(0, len(test), chunk):
    part = test[start:start + chunk]
    pad = chunk - len(part)
    part = np.concatenate([part, np.repeat(part[:1], pad, 0)]) if pad else part
    out.append(np.asarray(_knn_votes(train, y, jnp.asarray(part), k=k, num_classes=num_classes,
                                     temperature=float(temperature)))[:chunk - pad])
  return np.concatenate(out)


def knn_eval(train_x, train_y, test_x, test_y, num_classes: int, ks=(10, 20), temperature=KNN_TEMPERATURE):
  """{"k=K": classification scores} for each k."""
  return {f"k={k}": metrics.classification_scores(test_y, knn_probs(train_x, train_y, test_x, num_classes, k,
                                                                      temperature))
          for k in ks}


# ------------------------------------------------------------------------------------------ linear probe


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit_logistic(x, y, weights, lams, *, num_classes: int, max_iter: int, tol: float):
  """W [L, D, C], b [L, C], iterations [L]: one L-BFGS fit per penalty in `lams` (vmapped); rows weighted."""
  d = x.shape[1]
  wsum = jnp.sum(weights)

  def fit(lam):
    def loss(p):
      logits = x @ p["w"] + p["b"]
      ce = jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(logits, y)) / wsum
      return ce + 0.5 * lam * jnp.sum(p["w"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
      p, s = carry
      v, g = value_and_grad(p, state=s)
      u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
      return optax.apply_updates(p, u), s

    def cond(carry):
      _, s = carry
      it = optax.tree_utils.tree_get(s, "count")
      g = optax.tree_utils.tree_get(s, "grad")
      return (it == 0) | ((it < max_iter) & (optax.tree_utils.tree_norm(g) >= tol))

    p0 = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    p, s = jax.lax.while_loop(cond, body, (p0, opt.init(p0)))
    return p["w"], p["b"], optax.tree_utils.tree_get(s, "count")

  return jax.vmap(fit)(lams)


def fit_logistic(x, y, num_classes: int, cs=(1.0,), max_iter: int = 1000, tol: float = 1e-5, weights=None):
  """Multinomial L2 logistic regression for each C in `cs` (rows of x already standardised), on the rows with
  weight 1 of `weights` (0/1 row mask; default all), so fits on subsets share one compiled program.
  Returns (W [len(cs), D, C], b [len(cs), C], iterations [len(cs)])."""
  x = jnp.asarray(np.asarray(x, np.float32))
  weights = np.ones(x.shape[0], np.float32) if weights is None else np.asarray(weights, np.float32)
  lams = jnp.asarray([1.0 / (float(c) * weights.sum()) for c in cs], jnp.float32)
  w, b, its = _fit_logistic(x, jnp.asarray(np.asarray(y, np.int32)), jnp.asarray(weights), lams,
                            num_classes=int(num_classes), max_iter=int(max_iter), tol=float(tol))
  return np.asarray(w), np.asarray(b), np.asarray(its)


def logistic_probs(w, b, x) -> np.ndarray:
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  logits -= logits.max(axis=-1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(axis=-1, keepdims=True)


def stratified_holdout(y, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
  """A boolean [N] mask of held-out rows: `fraction` of every class (at least one where the class has two)."""
  y = np.asarray(y)
  rng = np.random.default_rng(seed)
  held = np.zeros(len(y), bool)
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    n = int(round(fraction * len(idx))) if len(idx) > 1 else 0
    held[idx[:max(n, 1 if len(idx) > 1 else 0)]] = True
  return held


def linear_eval(train_x, train_y, test_x, test_y, num_classes: int, *, cs=DEFAULT_CS, val_x=None, val_y=None,
                seed: int = 0, max_iter: int = 1000, tol: float = 1e-5) -> dict:
  """Linear probe: C by validation macro F1, refit on train + validation, test scores. Returns the test scores
  plus "c", "val_f1_macro" (per C) and "iterations". Both fits run on the same rows (0/1 weights): one compile."""
  train_x, train_y = np.asarray(train_x), np.asarray(train_y)
  if val_x is None:
    held = stratified_holdout(train_y, 0.2, seed)
  else:
    held = np.r_[np.zeros(len(train_y), bool), np.ones(len(val_y), bool)]
    train_x, train_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
  fit_rows = (~held).astype(np.float32)
  mean, std = _stats(train_x[~held])
  w, b, _ = fit_logistic((train_x - mean) / std, train_y, num_classes, cs, max_iter, tol, weights=fit_rows)
  v = ((train_x[held] - mean) / std).astype(np.float32)
  val_f1 = [metrics.classification_scores(train_y[held], logistic_probs(w[i], b[i], v))["f1_macro"]
            for i in range(len(cs))]
  best = int(np.argmax(val_f1))
  a, t = standardise(train_x, np.asarray(test_x))
  w, b, its = fit_logistic(a, train_y, num_classes, cs, max_iter, tol)
  scores = metrics.classification_scores(test_y, logistic_probs(w[best], b[best], t))
  return {**scores, "c": float(cs[best]), "val_f1_macro": dict(zip(map(float, cs), val_f1)),
          "iterations": int(its[best])}
