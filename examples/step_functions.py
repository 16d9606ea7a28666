"""FSL-SAGE's pure step functions in your own jit/vmap loop, for a few clients.

Every client is a slice of one pytree with a leading client axis. One local
step: each client's forward pass, the auxiliary estimate of the server's
cut-layer gradient, the client update (all vmapped); the server then takes a
step on each client's upload in turn, and every few steps the auxiliary models
are aligned to the server.

    python examples/step_functions.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fslsage_jax import broadcast, buffer_init, buffer_push, make_cnn, steps, weighted_average
from fslsage_jax.split import cut_shape, init_split

M, B = 3, 16                                         # clients, batch size
split = make_cnn((8, 8, 1), 10)
opt = optax.adam(1e-3)
z_shape, z_dtype = cut_shape(split)


@jax.jit                                              # one program, not one per eager op
def init(key):
    """Every client starts from the same model; the server and its optimizer are single."""
    cv, sv, av = init_split(split, key)
    clients, aux = broadcast(cv, M), broadcast(av, M)  # [M, ...] client and auxiliary models
    buf = broadcast(buffer_init(64, z_shape, (), z_dtype), M)
    return clients, jax.vmap(opt.init)(clients.params), aux, jax.vmap(opt.init)(aux.params), buf, \
        sv, opt.init(sv.params)


@jax.jit
def client_step(cv, copt, av, x, y):
    """One client: forward, auxiliary gradient estimate, backward + optimizer step."""
    z, vjp_fn, new_state = steps.client_forward(split, cv, x)
    g_hat = steps.aux_grad_estimate(split, av, z, y, jnp.ones(len(y)))
    cv, copt = steps.client_backward(opt, cv, copt, vjp_fn, g_hat, new_state)
    return cv, copt, z


@jax.jit
def server_steps(sv, sopt, z, y):
    """The server consumes the M uploads one after another (client order)."""
    def one(carry, zy):
        sv, sopt, _, loss = steps.server_step(split, opt, *carry, zy[0], zy[1], jnp.ones(B))
        return (sv, sopt), loss
    (sv, sopt), losses = jax.lax.scan(one, (sv, sopt), (z, y))
    return sv, sopt, losses


push = jax.jit(jax.vmap(buffer_push))
align = jax.jit(jax.vmap(lambda av, ao, sv, buf, k: steps.align(split, opt, av, ao, sv, buf, k, 5, 64),
                         in_axes=(0, 0, None, 0, 0)))

clients, client_opt, aux, aux_opt, buf, server, server_opt = init(jax.random.key(0))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(M, B, 8, 8, 1)), jnp.float32)   # stand-in data: one batch a client
y = jnp.asarray(rng.integers(0, 10, size=(M, B)), jnp.int32)
for t in range(6):
    clients, client_opt, z = jax.vmap(client_step)(clients, client_opt, aux, x, y)
    server, server_opt, losses = server_steps(server, server_opt, z, y)
    buf = push(buf, z, y, jnp.ones((M, B)))
    if t % 3 == 2:                                    # align every auxiliary model to the server
        aux, aux_opt, (first, last) = align(aux, aux_opt, server, buf, jax.random.split(jax.random.key(t), M))
        print(f"step {t}: alignment loss {float(first.mean()):.3g} -> {float(last.mean()):.3g}")
    print(f"step {t}: server loss {float(losses.mean()):.4f}")
global_client = weighted_average(clients, jnp.ones(M))    # the fed server's average
print("averaged client model:", jax.tree_util.tree_structure(global_client.params).num_leaves, "arrays")
