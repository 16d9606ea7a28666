"""LoRA's update is ``x @ (W + (alpha / r) A B)``: a block with LoRA equals the same block
without LoRA whose fused q|k|v kernel has the delta merged in by numpy (Hu et al. 2022)."""
import jax
import jax.numpy as jnp
import numpy as np

from fslsage_jax.models.gpt2 import Block, GPT2Client, GPT2Config

D, R, ALPHA = 8, 2, 6.0          # scale alpha / r = 3 (alpha alone would be 6)
CFG = GPT2Config(vocab_size=11, n_positions=5, n_embd=D, n_layer=2, n_head=2, n_client_blocks=1,
                 n_aux_blocks=1, lora_rank=R, lora_alpha=ALPHA, lora_dropout=0.0,
                 initializer_range=0.3)


def _known_lora(seed=0):
    """A and B of the q and v paths with fixed values (B is nonzero, unlike at init)."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=shape).astype(np.float32) for k, shape in [
        ("lora_q_a", (D, R)), ("lora_q_b", (R, D)), ("lora_v_a", (D, R)), ("lora_v_b", (R, D))]}


def _merged(frozen, lora):
    """The fused kernel ``[D, 3D]`` (columns q | k | v) with ``(alpha / r) A B`` added to q and v."""
    w = np.array(frozen["c_attn_kernel"], np.float64)
    s = ALPHA / R
    w[:, :D] += s * lora["lora_q_a"].astype(np.float64) @ lora["lora_q_b"]
    w[:, 2 * D:] += s * lora["lora_v_a"].astype(np.float64) @ lora["lora_v_b"]
    return {**frozen, "c_attn_kernel": jnp.asarray(w, jnp.float32)}


def _jit_apply(module):
    """``module.apply`` in eval mode as one program (op by op it compiles dozens of small ones)."""
    return jax.jit(lambda v, x: module.apply(v, x, train=False))


def test_lora_block_equals_base_block_with_the_merged_delta():
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    frozen = jax.jit(Block(CFG).init)({"params": jax.random.key(0)}, x)["frozen"]
    lora = _known_lora()
    got = _jit_apply(Block(CFG))({"params": lora, "frozen": frozen}, x)
    base_block = _jit_apply(Block(CFG, lora=False))
    want = base_block({"frozen": _merged(frozen, lora)}, x)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() < 1e-4 * np.abs(np.asarray(want)).max()
    # the delta matters at this size: without it the output is far away
    base = base_block({"frozen": frozen}, x)
    assert np.abs(np.asarray(got) - np.asarray(base)).max() > 0.1


def test_lora_client_part_equals_merged_base_client():
    # the same through the split's client part (embeddings + block h_0), token ids in
    ids = jnp.array([[1, 4, 7, 2, 9], [3, 3, 0, 10, 5]], jnp.int32)
    v = jax.jit(GPT2Client(CFG).init)({"params": jax.random.key(2)}, ids)
    lora = _known_lora(3)
    frozen = dict(v["frozen"])
    got = _jit_apply(GPT2Client(CFG))({"params": {"h_0": lora}, "frozen": frozen}, ids)
    frozen_m = {**frozen, "h_0": _merged(frozen["h_0"], lora)}
    want = _jit_apply(GPT2Client(CFG, lora=False))({"frozen": frozen_m}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
