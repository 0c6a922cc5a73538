"""Schedules against closed forms, the forward process, and the samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion.diffusion import (PREDICTIONS, SCHEDULES, SPACINGS, ddim_sample, ddim_timesteps, ddpm_sample, last_timestep,
                                         make_beta_schedule, noise_loss, q_sample, sample_timesteps,
                                         schedule_from_betas)


def test_linear_schedule_is_linear_in_sqrt_beta():
  betas = make_beta_schedule("linear", 1000, 0.0015, 0.0155)
  assert betas[0] == pytest.approx(0.0015, rel=1e-12)
  assert betas[-1] == pytest.approx(0.0155, rel=1e-12)
  np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.0155 ** 0.5 - 0.0015 ** 0.5) / 999, rtol=1e-9)
  # LDM's value at the midpoint, computed independently.
  t = 500 / 999
  assert betas[500] == pytest.approx(((1 - t) * 0.0015 ** 0.5 + t * 0.0155 ** 0.5) ** 2, rel=1e-12)


def test_sqrt_linear_and_sqrt_schedules():
  np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 10, 0.1, 0.2), np.linspace(0.1, 0.2, 10))
  np.testing.assert_allclose(make_beta_schedule("sqrt", 10, 0.1, 0.2), np.sqrt(np.linspace(0.1, 0.2, 10)))


def test_cosine_schedule_matches_alpha_bar_closed_form():
  s, T = 8e-3, 1000
  betas = make_beta_schedule("cosine", T, cosine_s=s)
  f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
  abar = np.cumprod(1 - betas)
  unclipped = np.arange(T) < T - 1  # the last beta is clipped at 0.999
  np.testing.assert_allclose(abar[unclipped], (f(np.arange(1, T + 1)) / f(0))[unclipped], rtol=1e-9)
  assert betas.max() <= 0.999


def test_unknown_schedule_and_loss_raise():
  with pytest.raises(ValueError, match="beta_schedule"):
    make_beta_schedule("quadratic", 10)
  with pytest.raises(ValueError, match="diffusion.loss"):
    noise_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "huber")


def test_timestep_sampling_uniform_and_logit_normal():
  key, n, T = jax.random.PRNGKey(0), 200_000, 1000
  uniform = np.asarray(sample_timesteps(key, n, T, "uniform"))
  assert uniform.dtype == np.int32 and uniform.min() == 0 and uniform.max() == T - 1
  assert np.mean((uniform >= 250) & (uniform < 750)) == pytest.approx(0.5, abs=0.01)
  mid = np.asarray(sample_timesteps(key, n, T, "logit_normal", 0.0, 1.0))
  assert mid.dtype == np.int32 and mid.min() >= 0 and mid.max() <= T - 1
  # t/T = sigmoid(z): 250 <= t < 750 <=> |z| < logit(0.75) = 1.0986, P = 0.7281 for z ~ N(0, 1).
  assert np.mean((mid >= 250) & (mid < 750)) == pytest.approx(0.7281, abs=0.01)
  assert np.median(mid) == pytest.approx(500, abs=5)
  shifted = np.asarray(sample_timesteps(key, n, T, "logit_normal", 1.0, 1.0))  # mean 1: toward noisier t
  assert np.median(shifted) == pytest.approx(T / (1 + np.exp(-1.0)), abs=5)
  with pytest.raises(ValueError, match="timestep_sampling"):
    sample_timesteps(key, 4, T, "beta")


def test_noise_loss_l1_and_l2():
  pred, target = jnp.array([[1.0, -1.0], [3.0, 0.0]]), jnp.zeros((2, 2))
  assert float(noise_loss(pred, target, "l1")) == pytest.approx((1 + 1.5) / 2)
  assert float(noise_loss(pred, target, "l2")) == pytest.approx((1 + 4.5) / 2)


def test_q_sample_statistics():
  sched = schedule_from_betas(make_beta_schedule("linear", 1000, 0.0015, 0.0155))
  x0 = jnp.full((20000, 4), 0.7)
  for t_val in (0, 300, 999):
    t = jnp.full((20000,), t_val)
    xt = q_sample(sched, x0, t, jax.random.normal(jax.random.PRNGKey(t_val), x0.shape))
    abar = float(sched.alphas_cumprod[t_val])
    assert float(xt.mean()) == pytest.approx(0.7 * abar ** 0.5, abs=0.01)
    assert float(xt.std()) == pytest.approx((1 - abar) ** 0.5, rel=0.03)


def test_ddim_timesteps_follow_ldm_uniform():
  np.testing.assert_array_equal(ddim_timesteps(1000, 200)[:3], [1, 6, 11])
  assert ddim_timesteps(1000, 200)[-1] == 996
  np.testing.assert_array_equal(ddim_timesteps(10, 10), np.arange(10))  # no +1 past the end
  with pytest.raises(ValueError):
    ddim_timesteps(10, 11)


def _oracle(sched, x0, prediction="eps"):
  """The perfect noise (or v) predictor for a known x0."""
  def eps_fn(x, t):
    a = sched.take("alphas_cumprod", t)[:, None, None, None]
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return eps if prediction == "eps" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
  return eps_fn


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
  sched = schedule_from_betas(make_beta_schedule("linear", 100, 0.0015, 0.0155))
  eps_fn = lambda x, t: 0.1 * x
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  a = ddim_sample(eps_fn, sched, x_T, jax.random.PRNGKey(1), 20, eta=0.0)
  b = ddim_sample(eps_fn, sched, x_T, jax.random.PRNGKey(2), 20, eta=0.0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = ddim_sample(eps_fn, sched, x_T, jax.random.PRNGKey(2), 20, eta=1.0)
  assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_samplers_with_the_exact_eps_recover_x0(kind, spacing, prediction):
  """Given the exact eps, DDIM (eta 0) and DDPM (the respaced posterior) end at x0 for every schedule and chain
  length: the 'sqrt' schedule's alpha_bar_T = 3e-44 underflows float32, and the cosine one's 2.4e-9 amplifies
  every rounding error by 1/sqrt(alpha_bar_T) on the first steps."""
  T = 1000
  sched = schedule_from_betas(make_beta_schedule(kind, T))
  x0 = jax.random.uniform(jax.random.PRNGKey(3), (2, 4, 4, 3), minval=-1, maxval=1)
  x_T = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
  abar = sched.alphas_cumprod
  for steps in (25, 50, 200, 1000):
    oracle = _oracle(sched, x0, prediction)
    ddpm = ddpm_sample(oracle, sched, x_T, jax.random.PRNGKey(5), steps, spacing=spacing, prediction=prediction)
    np.testing.assert_allclose(np.asarray(ddpm), np.asarray(x0), atol=2e-3, err_msg=f"DDPM {steps} steps")
    x, pred_x0 = ddim_sample(oracle, sched, x_T, jax.random.PRNGKey(6), steps, eta=0.0, return_x0=True,
                             spacing=spacing, prediction=prediction)
    np.testing.assert_allclose(np.asarray(pred_x0), np.asarray(x0), atol=2e-3, err_msg=f"DDIM {steps} steps")
    # The last DDIM step lands on alpha_bar_0 (LDM), along the line from x0 through the initial noise.
    t_first = ddim_timesteps(T, steps, spacing)[-1]
    eps = (np.asarray(x_T, np.float64) - np.sqrt(abar[t_first]) * np.asarray(x0)) / np.sqrt(1 - abar[t_first])
    expected = np.sqrt(abar[0]) * np.asarray(x0) + np.sqrt(1 - abar[0]) * eps
    np.testing.assert_allclose(np.asarray(x), expected, atol=2e-3, err_msg=f"DDIM {steps} steps")


def test_ddim_chains_visit_the_requested_timesteps():
  leading, trailing = ddim_timesteps(1000, 50, "leading"), ddim_timesteps(1000, 50, "trailing")
  assert len(leading) == len(trailing) == 50
  assert leading[-1] == 981 and trailing[-1] == 999 and trailing[0] == 19
  np.testing.assert_array_equal(ddim_timesteps(1000, 1000, "trailing"), np.arange(1000))
  sched = schedule_from_betas(make_beta_schedule("cosine", 1000))
  t_max = last_timestep(sched, 1e-4)
  assert sched.alphas_cumprod[t_max] >= 1e-4 > sched.alphas_cumprod[t_max + 1]
  with pytest.raises(ValueError, match="min_alpha_bar"):
    last_timestep(sched, 1.0)


def test_clipping_x0_keeps_a_wrong_denoiser_in_range_and_is_a_no_op_for_the_right_one():
  sched = schedule_from_betas(make_beta_schedule("cosine", 1000))
  x0 = jax.random.uniform(jax.random.PRNGKey(3), (2, 4, 4, 3), minval=-1, maxval=1)
  x_T = jax.random.normal(jax.random.PRNGKey(4), x0.shape)
  exact = ddim_sample(_oracle(sched, x0), sched, x_T, jax.random.PRNGKey(6), 50, eta=0.0, clip_x0=(-1.0, 1.0))
  plain = ddim_sample(_oracle(sched, x0), sched, x_T, jax.random.PRNGKey(6), 50, eta=0.0)
  np.testing.assert_allclose(np.asarray(exact), np.asarray(plain), atol=2e-3)
  # One step from t = T - 1 with an eps off by 1e-3: unclipped, x0 is off by 1e-3 / sqrt(2.4e-9) ~ 20.
  wrong = lambda x, t: _oracle(sched, x0)(x, t) + 1e-3
  first_x0 = lambda clip: ddim_sample(wrong, sched, x_T, jax.random.PRNGKey(6), 1, eta=0.0, return_x0=True,
                                      spacing="trailing", clip_x0=clip)[1]
  assert float(jnp.abs(first_x0(None) - x0).mean()) > 10
  assert float(jnp.abs(first_x0((-1.0, 1.0))).max()) <= 1.0


def test_v_weighting_turns_the_eps_loss_into_the_v_loss_until_the_cap():
  from concept_diffusion.diffusion import loss_weights, predict_x0
  schedule = schedule_from_betas(make_beta_schedule("cosine", 1000, 0.0015, 0.0155, 8e-3))
  assert loss_weights(schedule, jnp.arange(4), "none", 5.0) is None  # the official loss: every t weighs 1
  t = jnp.array([10, 300, 600, 990])
  weights = loss_weights(schedule, t, "v", 5.0)
  abar = schedule.alphas_cumprod[np.asarray(t)]
  np.testing.assert_allclose(weights, np.minimum(1 / abar, 5.0), rtol=1e-5)
  assert float(weights[-1]) == 5.0 and float(weights[0]) < 1.01
  # Below the cap, weight * |eps error|^2 = (1 + SNR) |x0 error|^2: the v-prediction loss.
  x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  noise = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  x_t = q_sample(schedule, x0, t, noise)
  eps_hat = noise + 0.1 * jax.random.normal(jax.random.PRNGKey(2), (4, 8))
  x0_err = np.square(np.asarray(predict_x0(schedule, x_t, t, eps_hat) - x0)).mean(axis=1)
  snr = abar / (1 - abar)
  weighted = np.asarray(weights) * np.square(np.asarray(eps_hat - noise)).mean(axis=1)
  np.testing.assert_allclose(weighted[:3], ((1 + snr) * x0_err)[:3], rtol=1e-3)
  # noise_loss applies per-example weights after the per-example mean.
  np.testing.assert_allclose(noise_loss(eps_hat, noise, "l2", weights), weighted.mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="loss_weighting"):
    loss_weights(schedule, t, "snr", 5.0)
