"""FedAvg (McMahan et al. 2017): every client trains the whole model (client part
then server part) locally; the fed server averages the full models each round.

Two variants (``Config.fedavg_server``):

- ``"copies"`` (default, textbook): every client trains its own copy of the whole
  model with its own optimizer; all copies are averaged. This computes exactly
  what SplitFed-MS computes; only the bytes differ (the whole model travels, no
  cut-layer messages).
- ``"shared"`` (the authors' code, whose FedAvg curves the paper shows): every
  client's model is its client part followed by ONE shared server part. In
  lockstep, at each local step the shared server part takes the clients'
  updates one after another in client order, each with that client's own
  optimizer state for it; only the client parts are really averaged. The bytes
  are FedAvg's either way.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fslsage_jax.algorithms import sl_single_server, steps
from fslsage_jax.algorithms.config import FEDAVG_SERVERS, Config, optimizer_for
from fslsage_jax.algorithms.definition import AlgorithmDef
from fslsage_jax.algorithms.engine import (Algorithm, add_loss, average_into, first, frozen_parts,
                                           global_vars, init_parts, lifter, make_run_round,
                                           resolve_config)
from fslsage_jax.algorithms.trees import broadcast, tree_where
from fslsage_jax.split import SplitModel, Vars

NAME = "fed_avg"


class FedAvgState(NamedTuple):
    """Textbook FedAvg: ``clients``, ``server`` (every client's copy) and ``client_opt``
    (one optimizer over the pair) carry a leading client axis."""
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Vars
    frozen: Any = None


class SharedServerFedAvgState(NamedTuple):
    """The authors' FedAvg: one ``server``; ``clients``, ``client_opt`` and
    ``server_opt`` (each client's optimizer state for the shared server) carry a
    leading client axis."""
    round: jax.Array
    clients: Vars
    client_opt: Any
    server: Vars
    server_opt: Any
    frozen: Any = None


def make(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """FedAvg for ``split`` and ``cfg``; client shards padded to ``n_max``."""
    if cfg.fedavg_server not in FEDAVG_SERVERS:
        raise ValueError(f"fedavg_server {cfg.fedavg_server!r}: choose from {FEDAVG_SERVERS}")
    cfg = resolve_config(cfg, split)
    if cfg.fedavg_server == "shared":
        return _make_shared(split, cfg, n_max)
    m, opt, L = cfg.num_clients, optimizer_for(cfg), lifter(cfg)

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        return FedAvgState(jnp.zeros((), jnp.int32), broadcast(cv, m),
                           broadcast(opt.init((cv.params, sv.params)), m), broadcast(sv, m), frozen)

    def client_step(fz, cv, sv, os, x, y, w, active, rng):
        new = steps.full_step(split, opt, cv.with_frozen(fz[0]), sv.with_frozen(fz[1]), os, x, y, w, rng)
        return tree_where(active, new[:3], (cv, sv, os)) + (new[3],)
    client_step = L(client_step, shared=1)

    def step(state, b, t, rng, acc):
        cv, sv, os, loss = client_step(frozen_parts(state), state.clients, state.server, state.client_opt,
                                       b.x, b.y, b.w, b.active, jax.random.split(rng, m))
        return state._replace(clients=cv, server=sv, client_opt=os), add_loss(acc, loss, b.w.sum(1))

    def end(state, weights, acc):
        return state._replace(clients=average_into(state.clients, weights),
                              server=average_into(state.server, weights)), acc

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), first(s.server)))


def _make_shared(split: SplitModel, cfg: Config, n_max: int) -> Algorithm:
    """The authors' FedAvg: client parts per client, one server part updated in client order."""
    m, opt = cfg.num_clients, optimizer_for(cfg)

    def init(key):
        cv, sv, _, frozen = init_parts(split, key)
        return SharedServerFedAvgState(jnp.zeros((), jnp.int32), broadcast(cv, m),
                                       broadcast(opt.init(cv.params), m), sv,
                                       broadcast(opt.init(sv.params), m), frozen)

    # SplitFed-SS's step with a per-client optimizer state for the server, no cut-layer bytes
    step = sl_single_server.make_step(split, cfg, per_client_server_opt=True, count=False)

    def end(state, weights, acc):
        return state._replace(clients=average_into(state.clients, weights)), acc

    return Algorithm(NAME, init, make_run_round(cfg, step, end, n_max),
                     lambda s: global_vars(s, first(s.clients), s.server))


def client_fields(cfg: Config) -> tuple[str, ...]:
    """Per-client state fields: the server copies (textbook) or the per-client server
    optimizer states (shared server)."""
    if cfg.fedavg_server == "shared":
        return ("clients", "client_opt", "server_opt")
    return ("clients", "client_opt", "server")


def persistent_fields(cfg: Config) -> tuple[str, ...]:
    """What each client keeps across rounds: its optimizer state (over the whole model, or
    over its client part plus its own state for the shared server part)."""
    return ("client_opt", "server_opt") if cfg.fedavg_server == "shared" else ("client_opt",)


ALGORITHM = AlgorithmDef(
    name=NAME, label="FedAvg", make=make, client_fields=client_fields,
    model_bytes=lambda sizes: sizes.client + sizes.server, uses=frozenset({"fedavg_server"}),
    color="tab:blue",
    persistent_fields=persistent_fields)
