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
      lr, weight_decay: learning rate and weight decay of the client and server models.
      optimizer: ``"adam"`` (PyTorch Adam: L2 decay added to the gradient; the
        image recipe) or ``"adamw"`` (decoupled decay; the GPT-2 LoRA recipe).
      adam_eps: Adam epsilon (1e-8; the GPT-2 recipe uses 1e-6).
      warmup_steps: linear learning-rate warm-up over this many optimizer steps (0: none).
      server_update_interval: Q, a client uploads when its local iteration
        index k satisfies k % Q == 0 (CSE-FSL, FSL-SAGE).
      align_interval: l, FSL-SAGE aligns the auxiliary models every l rounds.
      align_epochs, align_batch_size, align_buffer_size: alignment passes,
        minibatch, FIFO capacity per client.
      align_target_scale: ``"minibatch"`` (ours: the server's target gradients are
        those of each alignment minibatch's mean loss, the scale of the training-time
        estimate) or ``"buffer"`` (the authors' code: targets of the whole buffer's mean
        loss, smaller by buffer / minibatch when the buffer is larger).
      aux_lr, aux_weight_decay: the auxiliary model's own optimizer (Adam, PyTorch-style
        L2 decay; the authors' default lr 1e-3, no decay): CSE-FSL's local auxiliary
        training and FSL-SAGE's alignment.
      warm_start: FSL-SAGE only: run this many rounds of CSE-FSL first (the authors'
        option: 0 or 1); those rounds send CSE-FSL's messages and never align.
      fedavg_server: FedAvg only: ``"copies"`` (textbook: every client trains its own
        copy of the whole model; all averaged) or ``"shared"`` (the authors' code: one
        server part that, at each local step, takes the clients' updates in client
        order, each with that client's own optimizer state).
      align_client_chunk: clients aligned at once (vmapped; chunks one after another);
        0: all at once, unless one client's buffer of cut activations exceeds
        ``ALIGN_CHUNK_BYTES`` (a language model), then one at a time.
      eval_batch_size: evaluation minibatch; 0: as many samples as keep the logits of a
        batch under ``EVAL_LOGITS_BYTES`` (1,000 at most).
      strategy: how the client axis is executed: ``"auto"`` (the measured default for
        the backend, input shape and number of clients: ``lifting.auto_strategy``) or
        one of ``STRATEGIES``.
      chunk_size: clients per vmapped chunk for ``strategy="chunked"``.
      params: values of hyperparameters an algorithm declares itself
        (``AlgorithmDef.hyperparams``), as ``(name, value)`` pairs; e.g.
        ``(("proximal_weight", 0.01),)``. Unset ones take the declared default.
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
    align_target_scale: str = "minibatch"
    aux_lr: float = 1e-3
    aux_weight_decay: float = 0.0
    warm_start: int = 0
    fedavg_server: str = "copies"
    align_client_chunk: int = 0
    eval_batch_size: int = 0
    strategy: str = "auto"
    chunk_size: int = 8
    step_loop: str = "host"
    params: tuple = ()


OPTIMIZERS = ("adam", "adamw")
ALIGN_CHUNK_BYTES = 64 * 2 ** 20
EVAL_LOGITS_BYTES = 2 ** 30
ALIGN_TARGET_SCALES = ("minibatch", "buffer")
FEDAVG_SERVERS = ("copies", "shared")


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


def aux_optimizer_for(cfg: Config) -> optax.GradientTransformation:
    """The auxiliary model's optimizer: Adam with ``aux_lr`` and PyTorch-style L2 decay
    ``aux_weight_decay`` (CSE-FSL's local auxiliary training and FSL-SAGE's alignment)."""
    return make_optimizer(cfg.aux_lr, cfg.aux_weight_decay, "adam")
