"""One state shape for every algorithm, and the preamble every algorithm shares.

Every algorithm's state is a :class:`State`:

- ``round``: int32 scalar, rounds completed;
- ``clients``: a :class:`ClientState` whose two parts carry a leading client axis
  ``[m, ...]``: ``shared`` (what the round's aggregation averages, so identical for
  every client after a round: client models, SplitFed-MS's server copies, CSE-FSL's
  auxiliary models) and ``own`` (what each client keeps to itself across rounds:
  optimizer states, FSL-SAGE's auxiliary model and alignment buffer);
- ``server``: what the fed/main server holds once (a shared server and its
  optimizer state), or None;
- ``frozen``: None or ``(client, server, aux)`` frozen weights held once for all
  clients (e.g. GPT-2's base weights).

The rest of the library reads only this shape: sharding splits ``clients`` over
devices, a cohort run (:mod:`fslsage_jax.population`) keeps ``clients.own`` per
client on the host, aggregation averages ``clients.shared``. No field is named by
a string.

An algorithm module supplies ``build(ctx: Context) -> Parts`` (how one client's
state starts, the lockstep step, optionally its aggregation, and how to read the
global model); :func:`make_algorithm` does the rest.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fslsage_jax.algorithms import steps
from fslsage_jax.algorithms.config import Config, optimizer_for
from fslsage_jax.algorithms.lifting import lift
from fslsage_jax.algorithms.engine import (Algorithm, average_into, init_parts, lifter, make_run_round,
                                           make_serve, resolve_config)
from fslsage_jax.algorithms.trees import broadcast, tree_where
from fslsage_jax.split import SplitModel, Vars


class ClientState(NamedTuple):
    """Per-client state, every leaf ``[m, ...]``: ``shared`` (averaged each round) and
    ``own`` (kept by each client across rounds)."""
    shared: Any
    own: Any


class State(NamedTuple):
    """The state of every algorithm (see the module docstring)."""
    round: jax.Array
    clients: ClientState
    server: Any = None
    frozen: Any = None


class Server(NamedTuple):
    """A shared server's variables and optimizer state."""
    vars: Vars
    opt: Any


class Context(NamedTuple):
    """What an algorithm's ``build`` gets.

    Attributes:
      split: the split model.
      cfg: the configuration with its automatic settings resolved.
      n_max: padded shard length.
      m: number of clients of the compiled round.
      opt: the client/server optimizer.
      lift: ``lift(fn, shared=0)`` over the client axis with the configured strategy.
      hp: the algorithm's declared hyperparameters (defaults updated by ``cfg.params``).
    """
    split: SplitModel
    cfg: Config
    n_max: int
    m: int
    opt: optax.GradientTransformation
    lift: Callable
    hp: dict

    def serve(self, per_client_opt: bool = False) -> Callable:
        """A shared server consuming the uploads in client order (:func:`engine.make_serve`)."""
        return make_serve(self.split, self.opt, self.cfg, per_client_opt)

    def client_forward(self) -> Callable:
        """``forward(frozen_client, cv [m], x, w, rngs) -> (z, vjp, new_state)`` for all clients,
        ``vjp(g [m, B, ...]) -> (grads,)``.

        With one trace for all clients (``vmap``, ``map``, ``chunked``) each client's VJP is
        taken inside the lift (XLA:CPU runs the transpose of a vmapped convolution with
        per-client weights as a slow grouped convolution: 0.55 -> 7.4 s a 100-client round).
        Where clients are traced one by one (``unroll``, ``loop``) their VJP closures cannot
        be stacked, so the VJP is taken of the lifted forward pass instead.
        """
        split = self.split
        if self.cfg.strategy not in ("unroll", "loop"):
            fwd = self.lift(lambda fc, cv, x, w, r: steps.client_forward(split, cv.with_frozen(fc), x, r, w),
                            shared=1)
            pull = self.lift(lambda f, g: f(g))

            def forward(fc, cv, x, w, rngs):
                z, vjp_fn, new_state = fwd(fc, cv, x, w, rngs)
                return z, (lambda g: pull(vjp_fn, g)), new_state
            return forward
        apply = self.lift(lambda fc, p, s, x, w, r: steps.client_apply(split, Vars(p, s, fc), x, r, w),
                          shared=1)

        def forward(fc, cv, x, w, rngs):
            return jax.vjp(lambda p: apply(fc, p, cv.state, x, w, rngs), cv.params, has_aux=True)
        return forward

    def client_update(self) -> Callable:
        """``update(cv, opt_state, grads, new_state, active) -> (cv, opt_state)`` for all
        clients: one optimizer step each, kept only where ``active``."""
        opt = self.opt

        def one(cv, copt, g, cstate, active):
            updates, new_opt = opt.update(g, copt, cv.params)
            new = (Vars(optax.apply_updates(cv.params, updates), cstate), new_opt)
            return tree_where(active, new, (cv, copt))
        return self.lift_light(one)

    def lift_light(self, fn: Callable, shared: int = 0) -> Callable:
        """Lift a function whose per-client work is elementwise or small (an optimizer
        step, a buffer write): ``vmap`` where the strategy traces all clients once
        (``vmap``, ``map``, ``chunked``: no per-chunk loop writing every output back),
        else the configured strategy."""
        one_trace = self.cfg.strategy in ("vmap", "map", "chunked")
        return lift(fn, "vmap", shared=shared) if one_trace else self.lift(fn, shared=shared)


class Parts(NamedTuple):
    """An algorithm's own pieces.

    Attributes:
      init: ``init(client Vars, server Vars, aux Vars) -> (shared, own, server)`` for ONE
        client (frozen weights taken out); the engine gives ``shared`` and ``own`` the
        client axis.
      step: ``step(state, batch, t, rng, acc) -> (state, acc)``: one lockstep local step.
      global_model: ``global_model(shared_0, server) -> (client Vars, server Vars)`` from
        client 0's slice of ``clients.shared`` (after aggregation every client's).
      end: ``end(state, weights [m], acc) -> (state, acc)``; default: average
        ``clients.shared`` with ``weights``.
    """
    init: Callable
    step: Callable
    global_model: Callable
    end: Callable | None = None


def average_shared(state: State, weights: jax.Array, acc: dict) -> tuple[State, dict]:
    """The default aggregation: ``clients.shared`` averaged with weights n_i / n."""
    clients = state.clients._replace(shared=average_into(state.clients.shared, weights))
    return state._replace(clients=clients), acc


def frozen_of(state: State) -> tuple:
    """``(client, server, aux)`` frozen weights of ``state`` (Nones when there are none)."""
    return (None, None, None) if state.frozen is None else state.frozen


def hyperparameters(declared: dict, cfg: Config, name: str = "algorithm") -> dict:
    """The declared hyperparameters' defaults updated by ``cfg.params``.

    Raises:
      ValueError: ``cfg.params`` names one the algorithm does not declare.
    """
    given = dict(cfg.params)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ValueError(f"{name} has no hyperparameter {', '.join(unknown)}; "
                         f"it declares {sorted(declared) or 'none'}")
    return {**declared, **given}


def make_context(split: SplitModel, cfg: Config, n_max: int, declared: dict | None = None,
                 name: str = "algorithm") -> Context:
    """The :class:`Context` an algorithm is built in (``cfg`` resolved)."""
    cfg = resolve_config(cfg, split)
    return Context(split, cfg, n_max, cfg.num_clients, optimizer_for(cfg), lifter(cfg),
                   hyperparameters(declared or {}, cfg, name))


def make_algorithm(name: str, build: Callable[[Context], Parts], split: SplitModel, cfg: Config,
                   n_max: int, declared: dict | None = None, state_sharding: Any = None) -> Algorithm:
    """Build an algorithm from its ``build(ctx) -> Parts``.

    Args:
      name: its name (``Algorithm.name``).
      build: the algorithm's pieces for a :class:`Context`.
      split, cfg, n_max: the split model, the configuration, the padded shard length.
      declared: the algorithm's hyperparameters and their defaults.
      state_sharding: None, or the state's sharding prefix that the round's programs
        return it in (:func:`fslsage_jax.sharding.state_sharding`).
    Returns:
      the :class:`~fslsage_jax.algorithms.engine.Algorithm`.
    """
    ctx = make_context(split, cfg, n_max, declared, name)
    parts = build(ctx)

    def init(key):
        cv, sv, av, frozen = init_parts(split, key)
        shared, own, server = parts.init(cv, sv, av)
        clients = ClientState(broadcast(shared, ctx.m), broadcast(own, ctx.m))
        return State(jnp.zeros((), jnp.int32), clients, server, frozen)

    def global_model(state):
        shared0 = jax.tree_util.tree_map(lambda x: x[0], state.clients.shared)
        cv, sv = parts.global_model(shared0, state.server)
        fc, fs, _ = frozen_of(state)
        return cv.with_frozen(fc), sv.with_frozen(fs)

    run_round = make_run_round(ctx.cfg, parts.step, parts.end or average_shared, n_max, state_sharding)
    return Algorithm(name, init, run_round, global_model)
