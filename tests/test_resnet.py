"""ResNet-18 split: the paper's parameter counts, client->server == unsplit forward, masked BatchNorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.models import MODELS, ResNet18, make_resnet18
from fslsage_jax.split import Vars, apply_part, describe, init_split

W = 16
CLIENT_KEYS = {"conv1", "bn1", "layer1", "layer2"}
SERVER_KEYS = {"layer3", "layer4", "fc"}


@pytest.mark.parametrize("classes,server,aux", [(10, 10_498_570, 2_102_282), (100, 10_544_740, 2_125_412)])
def test_counts_equal_spec(classes, server, aux):
    d = describe(MODELS["resnet18"]((32, 32, 3), classes))
    assert d["param_counts"]["client"] == 683_072
    assert d["state_counts"]["client"] == 1_920
    assert d["param_counts"]["server"] == server
    assert d["param_counts"]["aux"] == aux
    assert d["cut_shape"] == [4, 4, 128]
    assert d["cut_bytes_per_sample"] == 2048 * 4
    if classes == 10:
        assert d["param_counts"]["full"] == 11_181_642
    # running mean + var of every BN channel: layer3+layer4 = 2*(5*256 + 5*512); aux = 2*5*256
    assert d["state_counts"]["server"] == 7_680 and d["state_counts"]["aux"] == 2_560
    assert d["model_bytes"]["client"] == 4 * (683_072 + 1_920)
    assert make_resnet18((32, 32, 3), classes).masked_batch_stats


def _random_vars(module, x, seed):
    """Variables of ``module`` with the shapes of its init, filled on the host (no per-op compiles):
    conv/dense kernels N(0, 2/fan_in), biases/BN scales and shifts and running means random, running
    variances positive (so eval-mode BatchNorm is not the identity)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape), s.dtype)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
        return jnp.asarray(rng.normal(0, 0.3, s.shape) + (1.0 if "scale" in name else 0.0), s.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def full():
    """Unsplit narrow ResNet-18 (base width 16 instead of 64: the same code with 16x fewer weights,
    cheap on CPU), 10 classes, on 16x16 inputs, random weights and running statistics."""
    x = jax.random.normal(jax.random.key(1), (5, 16, 16, 3))
    return _random_vars(ResNet18(10, width=W), x[:1], 0), x


def _split_vars(v, keys):
    stats = v["batch_stats"]
    return Vars({k: v["params"][k] for k in keys}, {"batch_stats": {k: stats[k] for k in keys if k in stats}})


def _close(a, b, rtol=1e-4, atol=1e-5):
    jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, rtol=rtol, atol=atol), a, b)


def test_split_variables_have_the_unsplit_names(full):
    v, _ = full
    assert set(v["params"]) == CLIENT_KEYS | SERVER_KEYS
    split = make_resnet18((16, 16, 3), 10, width=W)
    c, s, _ = jax.eval_shape(lambda k: init_split(split, k), jax.random.key(0))
    shapes = lambda t: jax.tree_util.tree_map(lambda a: a.shape, t)
    for part, keys in ((c, CLIENT_KEYS), (s, SERVER_KEYS)):
        mine = _split_vars(v, keys)
        assert shapes(part.params) == shapes(mine.params)
        assert shapes(part.state) == shapes(mine.state)


@pytest.mark.parametrize("train", [False, True])
def test_client_then_server_equals_unsplit(full, train):
    v, x = full
    split = make_resnet18((16, 16, 3), 10, width=W)
    cv, sv = _split_vars(v, CLIENT_KEYS), _split_vars(v, SERVER_KEYS)
    z, cstate = apply_part(split.client, cv, x, train)
    out, sstate = apply_part(split.server, sv, z, train)
    assert z.shape == (5, 2, 2, 2 * W) and out.shape == (5, 10)
    if train:
        ref, new = ResNet18(10, width=W).apply(v, x, train=True, mutable=["batch_stats"])
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        merged = {**cstate["batch_stats"], **sstate["batch_stats"]}
        _close(merged, dict(new["batch_stats"]))
        old = v["batch_stats"]["layer3"]["block0"]["bn1"]["mean"]
        assert not np.allclose(merged["layer3"]["block0"]["bn1"]["mean"], old)   # stats did move
    else:
        ref = ResNet18(10, width=W).apply(v, x, train=False)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
        assert cstate is cv.state
        # eval mode uses the running statistics: the logits of a sample do not depend on the batch
        np.testing.assert_allclose(ResNet18(10, width=W).apply(v, x[:2]), ref[:2], rtol=1e-5, atol=1e-5)


def test_stem_and_bn_momentum_by_hand(full):
    """bn1's new running stats = 0.9 * old + 0.1 * (mean, biased var) of the 7x7/2 pad-3 conv."""
    v, x = full
    c = _split_vars(v, CLIENT_KEYS)
    _, st = apply_part(make_resnet18((16, 16, 3), 10, width=W).client, c, x, True)
    k = c.params["conv1"]["kernel"]
    assert k.shape == (7, 7, 3, W)
    y = jax.lax.conv_general_dilated(x, k, (2, 2), ((3, 3), (3, 3)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert y.shape == (5, 8, 8, W)
    old, new = c.state["batch_stats"]["bn1"], st["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * y.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * y.var((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_masked_batch_stats_equal_real_rows_alone(full):
    v, x = full
    split = make_resnet18((16, 16, 3), 10, width=W)
    c = _split_vars(v, CLIENT_KEYS)
    real = x[:3]
    padded = jnp.concatenate([real, 50.0 + 10.0 * x[3:]])
    mask = jnp.array([True, True, True, False, False])
    z_ref, st_ref = apply_part(split.client, c, real, True)
    z, st = apply_part(split.client, c, padded, True, mask=mask)
    np.testing.assert_allclose(z[:3], z_ref, rtol=1e-4, atol=1e-4)
    _close(st, st_ref)
    # without the mask the padding does change the statistics
    _, st_nomask = apply_part(split.client, c, padded, True)
    assert not np.allclose(st_nomask["batch_stats"]["bn1"]["mean"], st_ref["batch_stats"]["bn1"]["mean"])
    # the server and the auxiliary take the mask too
    zp = jnp.concatenate([z_ref, 9.0 * jnp.ones((2, *z_ref.shape[1:]))])
    a = _random_vars(split.aux, z_ref[:1], 1)
    a = Vars(a["params"], {"batch_stats": a["batch_stats"]})
    for module, part in ((split.server, _split_vars(v, SERVER_KEYS)), (split.aux, a)):
        out_ref, s_ref = apply_part(module, part, z_ref, True)
        out, s = apply_part(module, part, zp, True, mask=mask)
        _close(s, s_ref)
        np.testing.assert_allclose(out[:3], out_ref, rtol=1e-4, atol=1e-4)
    # eval mode ignores the mask: running statistics, row by row
    ze, _ = apply_part(split.client, c, padded, False, mask=mask)
    np.testing.assert_allclose(ze[:3], apply_part(split.client, c, real, False)[0], rtol=1e-5, atol=1e-5)
    # an all-padding batch stays finite (falls back to every row)
    zn, stn = apply_part(split.client, c, padded, True, mask=jnp.zeros(5, bool))
    assert np.isfinite(zn).all() and all(np.isfinite(t).all() for t in jax.tree_util.tree_leaves(stn))


def test_initialisation_like_torchvision():
    """On the (narrow) auxiliary: its conv, BN and dense use the same initialisers as every part."""
    aux = make_resnet18((16, 16, 3), 10, width=W).aux
    v = jax.jit(aux.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 2, 2, 2 * W)))   # one program, not ~30
    p = v["params"]
    k = np.asarray(p["layer"]["block1"]["conv2"]["kernel"])          # 3x3x4Wx4W, fan_out 9*4W
    assert k.shape == (3, 3, 4 * W, 4 * W)
    assert abs(k.std() / np.sqrt(2.0 / (9 * 4 * W)) - 1) < 0.03 and abs(k.mean()) < 3e-3
    down = np.asarray(p["layer"]["block0"]["downsample_conv"]["kernel"])   # 1x1, fan_out 4W
    assert down.shape == (1, 1, 2 * W, 4 * W)
    assert abs(down.std() / np.sqrt(2.0 / (4 * W)) - 1) < 0.1
    bound = 1 / np.sqrt(4 * W)
    assert p["fc"]["kernel"].shape == (4 * W, 10)
    for w in (np.asarray(p["fc"]["kernel"]), np.asarray(p["fc"]["bias"])):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.5 * bound and w.min() < 0 < w.max()
    bn = p["layer"]["block0"]["bn1"]
    assert np.all(bn["scale"] == 1) and np.all(bn["bias"] == 0)
    stats = v["batch_stats"]["layer"]["block0"]["bn1"]
    assert np.all(stats["mean"] == 0) and np.all(stats["var"] == 1)
    assert set(p["layer"]["block0"]["conv1"]) == {"kernel"}                 # no conv bias
