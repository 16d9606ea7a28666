"""Hyperparameters of a run and the optimizers built from them."""
from __future__ import annotations

import dataclasses

import optax

STRATEGIES = ("vmap", "map", "chunked", "unroll", "loop")
STEP_LOOPS = ("scan", "host")


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a federated split learning run (defaults: the paper's).

    Attributes:
      num_clients: m, number of simulated clients.
      local_epochs: E, local epochs per round.
      batch_size: B, local minibatch size.
      lr, weight_decay: learning rate and weight decay for client, server and
        CSE-FSL auxiliary models.
      optimizer: ``"adam"`` (PyTorch Adam: L2 decay added to the gradient; the
        image recipe) or ``"adamw"`` (decoupled decay; the GPT-2 LoRA recipe).
      adam_eps: Adam epsilon (1e-8; the GPT-2 recipe uses 1e-6).
      warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
      server_update_interval: Q, a client uploads when its local iteration
        index k satisfies k % Q == 0 (CSE-FSL, FSL-SAGE).
      align_interval: l, FSL-SAGE aligns the auxiliary models every l rounds.
      align_epochs, align_batch_size, align_buffer_size, align_lr: alignment
        passes, minibatch, FIFO capacity per client, Adam learning rate.
      strategy: how the client axis is executed: ``"auto"`` (the measured default for
        the backend, input shape and number of clients: ``lifting.auto_strategy``) or
        one of ``STRATEGIES``.
      chunk_size: clients per vmapped chunk for ``strategy="chunked"``.
      step_loop: ``"scan"`` compiles a whole round as one ``lax.scan`` over the
        local steps; ``"host"`` calls one compiled step per local step from
        Python (never a loop over clients).
    """
    num_clients: int = 3
    local_epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    server_update_interval: int = 5
    align_interval: int = 10
    align_epochs: int = 100
    align_batch_size: int = 1000
    align_buffer_size: int = 1000
    align_lr: float = 1e-3
    strategy: str = "auto"
    chunk_size: int = 8
    step_loop: str = "host"


OPTIMIZERS = ("adam", "adamw")


def make_optimizer(lr: float, weight_decay: float, kind: str = "adam", eps: float = 1e-8,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
    """The client/server optimizer.

    Args:
      lr: peak learning rate.
      weight_decay: ``"adam"``: PyTorch-style L2 decay added to the gradient;
        ``"adamw"``: decoupled decay (PyTorch ``AdamW``).
      kind: ``"adam"`` or ``"adamw"``.
      eps: Adam epsilon.
      warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant.
    """
    sched = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0 else lr)
    if kind == "adam":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(sched, eps=eps))
    if kind == "adamw":
        return optax.adamw(sched, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; choose from {OPTIMIZERS}")


def optimizer_for(cfg: Config) -> optax.GradientTransformation:
    """:func:`make_optimizer` from a :class:`Config`."""
    return make_optimizer(cfg.lr, cfg.weight_decay, cfg.optimizer, cfg.adam_eps, cfg.warmup_steps)
