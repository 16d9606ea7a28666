"""The client/server optimizer: PyTorch Adam (L2) vs AdamW, epsilon, warm-up."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fslsage_jax.algorithms.config import Config, make_optimizer, optimizer_for


def _updates(opt, grads, params, steps):
    state, out = opt.init(params), []
    for _ in range(steps):
        u, state = opt.update(grads, state, params)
        out.append(float(u[0]))
    return out


def test_adam_l2_vs_adamw_decoupled_by_hand():
    p, g = jnp.array([2.0]), jnp.array([0.5])
    # Adam with L2: gradient 0.5 + 0.1 * 2 = 0.7; first Adam step = -lr * sign = -lr (bias corrected)
    assert _updates(make_optimizer(0.01, 0.1), g, p, 1)[0] == pytest.approx(-0.01, rel=1e-4)
    # AdamW: -lr * (m/sqrt(v) + wd * p) = -0.01 * (1 + 0.1 * 2)
    assert _updates(make_optimizer(0.01, 0.1, "adamw"), g, p, 1)[0] == pytest.approx(-0.012, rel=1e-4)


def test_linear_warmup_and_eps():
    p, g = jnp.array([0.0]), jnp.array([1e-7])
    ups = _updates(make_optimizer(1.0, 0.0, "adamw", eps=1e-6, warmup_steps=4), g, p, 6)
    # step t uses lr * t / 4 (0 at the first step); |m/(sqrt(v)+eps)| = 1e-7 / (1e-7 + 1e-6)
    r = 1e-7 / (1e-7 + 1e-6)
    np.testing.assert_allclose(ups, [-r * min(t / 4, 1.0) for t in range(6)], rtol=1e-3, atol=1e-9)


def test_config_optimizer_and_unknown_kind():
    cfg = Config(optimizer="adamw", lr=0.01, weight_decay=0.1)
    assert _updates(optimizer_for(cfg), jnp.array([0.5]), jnp.array([2.0]), 1)[0] == pytest.approx(-0.012, rel=1e-4)
    with pytest.raises(ValueError, match="adamw"):
        make_optimizer(0.1, 0.0, "sgd")
    assert isinstance(make_optimizer(0.1, 0.0), optax.GradientTransformation)
