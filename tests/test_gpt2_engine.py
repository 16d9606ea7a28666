"""The split GPT-2 with LoRA through the engine: learning, frozen weights, token-weighted evaluation.

Rows have the E2E layout ``MR ||| text <eot>`` on a 23-token vocabulary: the
text is the MR shifted by 8, so a tiny GPT-2 can learn it with LoRA alone.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.algorithms import ALGORITHMS
from fslsage_jax.algorithms.config import Config
from fslsage_jax.algorithms.engine import ClientArrays, make_evaluate
from fslsage_jax.models.gpt2 import IGNORE, GPT2Config, lm_loss_sums, make_gpt2
from fslsage_jax.split import apply_part

EOT, SEP, T = 0, 1, 7
# 2 blocks (client 1, server 1, aux 1): the fewest that split; a third block only adds compile time
CFG = GPT2Config(vocab_size=23, n_positions=8, n_embd=32, n_layer=2, n_head=2, n_aux_blocks=1,
                 lora_rank=4, lora_dropout=0.0, initializer_range=0.3)


def rows(n, seed):
    mr = np.random.default_rng(seed).integers(2, 10, (n, 3))
    s = np.concatenate([mr, np.full((n, 1), SEP), mr + 8, np.full((n, 1), EOT)], 1)   # [n, 8]
    x, y = s[:, :-1], s[:, 1:].copy()
    y[:, :3] = IGNORE                     # targets inside the MR and the separator do not count
    return x.astype(np.int32), y.astype(np.int32)


def test_token_weighted_eval_is_log_perplexity():
    split = make_gpt2(CFG, T)
    x, y = rows(5, 0)
    y[0, 3:5] = IGNORE                    # uneven token counts per sample
    from fslsage_jax.split import init_split
    cv, sv, _ = init_split(split, jax.random.key(0))

    @jax.jit                              # the reference as one program, not op by op
    def reference(cv, sv, x, y):
        z, _ = apply_part(split.client, cv, x, False)
        logits, _ = apply_part(split.server, sv, z, False)
        return lm_loss_sums(logits, y)
    sums, counts = reference(cv, sv, jnp.asarray(x), jnp.asarray(y))
    loss, _ = make_evaluate(split, batch_size=2)(cv, sv, jnp.asarray(x), jnp.asarray(y))
    assert loss == pytest.approx(float(sums.sum() / counts.sum()), rel=1e-5)


@pytest.mark.parametrize("algo", ["fsl_sage", "cse_fsl"])
def test_validation_loss_falls_frozen_never_changes(algo):
    split = make_gpt2(CFG, T)
    x, y = rows(64, 1)
    xv, yv = rows(32, 2)
    data = ClientArrays(jnp.asarray(x.reshape(2, 32, T)), jnp.asarray(y.reshape(2, 32, T)),
                        jnp.array([32, 32], jnp.int32))
    cfg = Config(num_clients=2, batch_size=8, optimizer="adamw", lr=2e-2, weight_decay=0.01,
                 adam_eps=1e-6, server_update_interval=1, align_interval=2, align_epochs=2,
                 align_batch_size=8, align_buffer_size=16)
    a = ALGORITHMS[algo](split, cfg, 32)
    state = a.init(jax.random.key(0))
    frozen0 = jax.tree_util.tree_map(np.array, state.frozen)
    assert jax.tree_util.tree_leaves(state.clients.shared)[0].shape[0] == 2    # LoRA: client axis
    assert all(leaf.shape[0] != 2 or leaf.ndim < 2 for leaf in jax.tree_util.tree_leaves(frozen0[0]))
    evaluate = make_evaluate(split)
    losses = [evaluate(*a.global_model(state), jnp.asarray(xv), jnp.asarray(yv))[0]]
    for r in range(4):
        state, _ = a.run_round(state, data, jax.random.key(r))
        losses.append(evaluate(*a.global_model(state), jnp.asarray(xv), jnp.asarray(yv))[0])
    # measured: 4.90, 3.00, 2.22, 1.99, 1.72 (fsl_sage); 4.90, 2.99, 2.24, 1.98, 1.79 (cse_fsl)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.45 * losses[0], losses
    # both sides trained their LoRA: every B matrix started at zero and has moved (a frozen
    # client would leave its B at 0 while the server's training alone still lowers the loss)
    for part in a.global_model(state):
        bs = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(part.params)
              if str(path[-1].key).endswith("_b")]
        size = [float(jnp.max(jnp.abs(b))) for b in bs]
        assert bs and min(size) > 1e-3, size
    for f0, f1 in zip(jax.tree_util.tree_leaves(frozen0), jax.tree_util.tree_leaves(state.frozen)):
        np.testing.assert_array_equal(f0, f1)
