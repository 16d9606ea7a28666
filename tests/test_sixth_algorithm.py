"""A sixth algorithm defined entirely here, through the public API only: SplitFed-MS
with a FedProx proximal term mu/2 ||w - w_global||^2 on each client's model. It runs
through ``fslsage_jax.train`` on digits, its bytes come from the ledger, and its result
equals a small hand-written loop (flax apply, jax.grad, optax; none of the library's
steps or averaging helpers)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import fslsage_jax as fj

M, N, CUT = 3, 40, 16


def build(ctx: fj.Context) -> fj.Parts:
    """Per-client server copies (as SplitFed-MS) and a proximal client update; the round's
    global client model is kept in ``server`` (the fed server's copy)."""
    split, opt, mu = ctx.split, ctx.opt, ctx.hp["proximal_weight"]

    def client_step(g, cv, sv, copt, sopt, x, y, w, active, rng):
        z, vjp_fn, cstate = fj.steps.client_forward(split, cv, x, None, w)
        sv2, sopt2, gz, loss = fj.steps.server_step(split, opt, sv, sopt, z, y, w)
        (grads,) = vjp_fn(gz)
        grads = jax.tree_util.tree_map(lambda gr, p, p0: gr + mu * (p - p0), grads, cv.params, g)
        updates, copt2 = opt.update(grads, copt, cv.params)
        cv2 = fj.Vars(optax.apply_updates(cv.params, updates), cstate)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, old)
        return keep((cv2, sv2, copt2, sopt2), (cv, sv, copt, sopt)) + (loss,)
    lifted = ctx.lift(client_step, shared=1)

    def step(state, b, t, rng, acc):
        (cv, sv), (copt, sopt) = state.clients
        cv, sv, copt, sopt, loss = lifted(state.server, cv, sv, copt, sopt, b.x, b.y, b.w, b.active,
                                             jax.random.split(rng, ctx.m))
        n = jnp.sum(b.w).astype(jnp.int32)
        acc = {**acc, "loss_sum": acc["loss_sum"] + jnp.sum(loss * b.w.sum(1)),
               "loss_n": acc["loss_n"] + jnp.sum(b.w), "z_up": acc["z_up"] + n, "g_down": acc["g_down"] + n}
        return state._replace(clients=fj.ClientState((cv, sv), (copt, sopt))), acc

    def end(state, weights, acc):
        w = weights / jnp.sum(weights)
        avg = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(jnp.tensordot(w, a, 1), a.shape),
                                     state.clients.shared)
        return state._replace(clients=state.clients._replace(shared=avg),
                              server=jax.tree_util.tree_map(lambda a: a[0], avg[0].params)), acc

    return fj.Parts(init=lambda cv, sv, av: ((cv, sv), (opt.init(cv.params), opt.init(sv.params)), cv.params),
                    step=step, end=end, global_model=lambda shared, server: shared)


FEDPROX_SPLIT = fj.AlgorithmDef(name="fedprox_split", label="SplitFed-MS + FedProx", build=build,
                                model_bytes=lambda sizes: sizes.client,
                                hyperparams={"proximal_weight": fj.Hyper(0.01, "mu of the proximal term")})


class Client(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(CUT)(x.reshape(x.shape[0], -1)))


class Server(nn.Module):
    @nn.compact
    def __call__(self, z):
        return nn.Dense(10)(z)


def _digits():
    x, y = load_digits(return_X_y=True)
    x, y = (x[: M * N + 50] / 16.0).astype(np.float32), y[: M * N + 50].astype(np.int32)
    return (x[: M * N].reshape(M, N, 64), y[: M * N].reshape(M, N)), (x[M * N:], y[M * N:])


def _reference(split, cfg, clients, mus, rounds):
    """Hand-written loop: full-shard batches (the shuffle does not matter), 2 local epochs.
    One client's local step is jitted with mu traced: one compile for every mu.
    Returns {mu: (client params, server params)}."""
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.adam(cfg.lr))

    @jax.jit
    def local_step(c, s, copt, sopt, g, x, y, mu):
        z, vjp = jax.vjp(lambda p: split.client.apply({"params": p}, x), c)
        ce = lambda sp, z: optax.softmax_cross_entropy_with_integer_labels(
            split.server.apply({"params": sp}, z), y).mean()
        gs, gz = jax.grad(ce, (0, 1))(s, z)
        u, sopt = tx.update(gs, sopt, s)
        s = optax.apply_updates(s, u)
        gc = jax.tree_util.tree_map(lambda a, p, p0: a + mu * (p - p0), vjp(gz)[0], c, g)
        u, copt = tx.update(gc, copt, c)
        return optax.apply_updates(c, u), s, copt, sopt

    out = {}
    for mu in mus:
        cv, sv, _ = fj.init_split(split, jax.random.fold_in(jax.random.key(0), 0))
        g, s = cv.params, sv.params
        copts = [tx.init(g) for _ in range(M)]
        sopts = [tx.init(s) for _ in range(M)]
        for _ in range(rounds):
            cs, ss = [g] * M, [s] * M
            for _ in range(cfg.local_epochs):
                for i in range(M):
                    cs[i], ss[i], copts[i], sopts[i] = local_step(cs[i], ss[i], copts[i], sopts[i], g,
                                                                  clients[0][i], clients[1][i], mu)
            g = jax.tree_util.tree_map(lambda *a: sum(a) / M, *cs)
            s = jax.tree_util.tree_map(lambda *a: sum(a) / M, *ss)
        out[mu] = g, s
    return out


def test_a_sixth_algorithm_defined_in_a_test_runs_counts_bytes_and_matches_a_hand_loop():
    split = fj.SplitModel("digits_mlp", Client(), Server(), Server(), input_shape=(64,), num_classes=10)
    clients, test = _digits()
    results, mus = {}, (0.0, 0.5)
    cfgs = {mu: fj.Config(num_clients=M, batch_size=N, local_epochs=2, lr=1e-2, params=(("proximal_weight", mu),))
            for mu in mus}
    wants = _reference(split, cfgs[0.0], clients, mus, 3)       # the configs differ in mu only
    for mu in mus:
        cfg = cfgs[mu]
        r = fj.train(FEDPROX_SPLIT, split, clients, test, cfg, rounds=3)
        want_c, want_s = wants[mu]
        for got, want in ((r.client.params, want_c), (r.server.params, want_s)):
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        results[mu] = r
        # the ledger: every sample's cut activation up and its gradient down at each of the 2
        # local steps of the 3 rounds; each client's model (Dense 64 -> 16) up and down per round
        z_bytes, client_bytes = CUT * 4, (64 * CUT + CUT) * 4
        comm = r.summary["comm"]
        assert comm["smashed_up"] == comm["grad_down"] == 3 * 2 * M * N * z_bytes
        assert comm["model_up"] == comm["model_down"] == 3 * M * client_bytes
        assert r.summary["total_bytes"] == 2 * 3 * 2 * M * N * z_bytes + 2 * 3 * M * client_bytes
        assert r.summary["rounds_run"] == 3 and r.summary["final_accuracy"] > 0.3
    # the proximal term changes the trajectory
    a, b = (jax.tree_util.tree_leaves(results[mu].client.params)[0] for mu in (0.0, 0.5))
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_undeclared_hyperparameters_are_refused():
    import pytest
    split = fj.SplitModel("digits_mlp", Client(), Server(), Server(), input_shape=(64,), num_classes=10)
    clients, test = _digits()
    with pytest.raises(ValueError, match="no hyperparameter proximal_wieght"):
        fj.train(FEDPROX_SPLIT, split, clients, test,
                 fj.Config(num_clients=M, params=(("proximal_wieght", 1.0),)), rounds=1)


def test_the_cli_derives_a_flag_from_a_declared_hyperparameter(monkeypatch):
    import importlib.util
    import os
    from fslsage_jax import algorithms
    from fslsage_jax.experiment import ConfigError, ExperimentConfig, algorithm_config, validate
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("cli_run", os.path.join(root, "experiments", "run.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setitem(algorithms.ALGORITHMS, FEDPROX_SPLIT.name, FEDPROX_SPLIT)
    monkeypatch.setattr(cli, "ALGORITHMS", algorithms.ALGORITHMS)
    parser = cli.build_parser()
    assert "--proximal-weight" in parser.format_help() and "mu of the proximal term" in parser.format_help()
    cfg = cli.experiment_config(parser.parse_args(["--algo", "fedprox_split", "--proximal-weight", "0.25"]))
    assert cfg.algo_params == (("proximal_weight", 0.25),)
    assert algorithm_config(cfg).params == (("proximal_weight", 0.25),)
    validate(cfg)
    import pytest
    with pytest.raises(ConfigError, match="not used by"):     # another algorithm cannot read it
        validate(ExperimentConfig(algo="fed_avg", algo_params=(("proximal_weight", 0.25),)))
