"""Split GPT-2 with LoRA: split == unsplit, LoRA B = 0 == base model, GPT-2 medium counts,
HF weight round trip against a numpy reference, losses by hand, greedy decoding, tokenizer."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fslsage_jax.lm import corpus_bleu, decode_generated, greedy_generate
from fslsage_jax.models.gpt2 import (
    GPT2_MEDIUM,
    GPT2Config,
    GPT2Full,
    config_from_hf,
    lm_correct,
    lm_eval_loss,
    lm_loss,
    lm_loss_sums,
    make_gpt2,
    tie_embeddings,
)
from fslsage_jax.models.gpt2_weights import (
    frozen_from_state_dict,
    load_gpt2_weights,
    load_tokenizer,
    random_init_notice,
    read_config,
)
from fslsage_jax.split import Vars, apply_part, describe, init_split

# Small enough to compile in about a second: 3 blocks, width 16, 2 heads, vocabulary 23.
CFG = GPT2Config(vocab_size=23, n_positions=12, n_embd=16, n_layer=3, n_head=2, n_aux_blocks=1)
T = 7
SPLIT = make_gpt2(CFG, T)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = [os.path.join(ROOT, "..", "shared", "data"), "/work/shared/data"]
VOCAB = next((os.path.join(p, "gpt2-vocab") for p in SHARED
              if os.path.exists(os.path.join(p, "gpt2-vocab", "vocab.json"))), None)


def ids(seed=0, b=2, t=T, v=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, v, jnp.int32)


def randomise_lora(params, key):
    """Every LoRA B drawn N(0, 0.5) (they start at zero) so that LoRA changes the output."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    new = [0.5 * jax.random.normal(k, l.shape) if str(p[-1].key).endswith("_b") else l
           for (p, l), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, new)


def full_vars(key=0):
    """GPT2Full's variables (its layout is the client's and server's side by side), taken from
    the split's initialisation: one init program serves the split and the unsplit model."""
    c, s, _ = init_split(SPLIT, jax.random.key(key))
    return {"params": {"client": c.params, "server": s.params},
            "frozen": {"client": c.frozen, "server": s.frozen}}


@functools.cache
def _full_apply_compiled(lora, train, dropout):
    def apply(v, x, key):
        return GPT2Full(CFG, lora=lora).apply(v, x, train=train, rngs={"dropout": key} if dropout else None)
    return jax.jit(apply)


def full_apply(v, x, train=False, lora=True, dropout_key=None):
    """GPT2Full(CFG).apply as one compiled program per mode (op by op it compiles ~70 small ones)."""
    return _full_apply_compiled(lora, train, dropout_key is not None)(v, x, dropout_key)


@jax.jit
def split_logits(cv, sv, x):
    """The split model's client then server part (eval mode): cut activations and logits."""
    z, _ = apply_part(SPLIT.client, cv, x, train=False)
    return z, apply_part(SPLIT.server, sv, z, train=False)[0]


def test_split_logits_equal_unsplit_model():
    v = full_vars()
    v["params"] = randomise_lora(v["params"], jax.random.key(1))
    x = ids(2)
    ref = full_apply(v, x)
    cv = Vars(v["params"]["client"], {}, v["frozen"]["client"])
    sv = Vars(v["params"]["server"], {}, v["frozen"]["server"])
    z, logits = split_logits(cv, sv, x)
    assert z.shape == (2, T, CFG.n_embd)
    assert logits.shape == (2, T, CFG.vocab_size)
    np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_lora_b_zero_equals_base_model_and_nonzero_b_does_not():
    v = full_vars()
    x = ids(3)
    base = full_apply({"frozen": v["frozen"]}, x, lora=False)
    np.testing.assert_allclose(full_apply(v, x), base, atol=1e-6)
    v2 = {**v, "params": randomise_lora(v["params"], jax.random.key(4))}
    assert np.abs(full_apply(v2, x) - base).max() > 1e-3


def test_lora_dropout_only_in_train_mode():
    v = full_vars()
    v["params"] = randomise_lora(v["params"], jax.random.key(5))
    x = ids(6)
    ev = full_apply(v, x)
    np.testing.assert_allclose(full_apply(v, x, dropout_key=jax.random.key(0)), ev)
    tr = full_apply(v, x, train=True, dropout_key=jax.random.key(0))
    assert np.abs(tr - ev).max() > 1e-4
    # train mode without a dropout rng (the engine's gradient-only passes): no dropout
    np.testing.assert_allclose(full_apply(v, x, train=True), ev, atol=1e-6)
    # with B = 0 the LoRA path (the only dropout) contributes nothing, even in train mode
    v0 = full_vars()
    np.testing.assert_allclose(full_apply(v0, x, train=True, dropout_key=jax.random.key(0)),
                               full_apply(v0, x), atol=1e-6)


def test_init_split_trainable_is_lora_only_and_embedding_tied():
    split = SPLIT
    c, s, a = init_split(split, jax.random.key(0))
    names = lambda t: {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
    assert names(c.params) == names(s.params) == {"lora_q_a", "lora_q_b", "lora_v_a", "lora_v_b"}
    assert set(c.params) == {"h_0"} and set(s.params) == {"h_1", "h_2"}
    np.testing.assert_array_equal(c.frozen["wte"], s.frozen["wte"])
    np.testing.assert_array_equal(c.frozen["wte"], a.frozen["wte"])
    # aux_mode="lora" (default, the paper's): frozen aux blocks with LoRA
    assert names(a.params) == {"lora_q_a", "lora_q_b", "lora_v_a", "lora_v_b"}
    assert "c_attn_kernel" in a.frozen["h_1"]
    c, s, a = tie_embeddings(c, s, a)
    assert s.frozen["wte"] is c.frozen["wte"] and a.frozen["wte"] is c.frozen["wte"]
    # aux_mode="full" (the authors' code): trainable random blocks without LoRA, only wte frozen
    # (which variables exist: shapes suffice, no initialisation program to compile)
    full_aux = make_gpt2(GPT2Config(**{**CFG.__dict__, "aux_mode": "full"}), T)
    _, _, a = jax.eval_shape(functools.partial(init_split, full_aux), jax.random.key(0))
    assert set(a.frozen) == {"wte"} and "c_attn_kernel" in a.params["h_1"]
    assert "lora_q_a" not in a.params["h_1"]


def test_describe_gpt2_medium_shapes_only():
    d = describe(make_gpt2(GPT2_MEDIUM, 512))
    assert d["param_counts"]["client"] + d["param_counts"]["server"] == 393_216
    assert d["param_counts"]["client"] == 2 * 2 * 1024 * 4
    block = 12 * 1024 * 1024 + 13 * 1024   # 4 kernels (3+1+4+4 D^2) and 13 D of biases / norms
    assert d["frozen_counts"]["client"] == 50257 * 1024 + 1024 * 1024 + block
    assert d["frozen_counts"]["server"] == 23 * block + 2 * 1024 + 50257 * 1024
    assert d["cut_shape"] == [512, 1024]
    assert d["model_bytes"]["full"] == 393_216 * 4


# ---------------------------------------------------------------- HF weights ----

def hf_tensors(c: GPT2Config, seed=0, prefix=""):
    """Random tensors with Hugging Face GPT-2 key names and shapes."""
    rng = np.random.default_rng(seed)
    d = c.n_embd
    shapes = {"wte.weight": (c.vocab_size, d), "wpe.weight": (c.n_positions, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(c.n_layer):
        shapes.update({f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
                       f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
                       f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
                       f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
                       f"h.{i}.mlp.c_fc.weight": (d, 4 * d), f"h.{i}.mlp.c_fc.bias": (4 * d,),
                       f"h.{i}.mlp.c_proj.weight": (4 * d, d), f"h.{i}.mlp.c_proj.bias": (d,),
                       f"h.{i}.attn.bias": (1, 1, c.n_positions, c.n_positions)})
    def draw(k, s):
        if "ln_" in k and k.endswith(".weight"):
            return 1.0 + 0.2 * rng.standard_normal(s)
        return (0.1 if k.endswith(".bias") else 0.3) * rng.standard_normal(s)
    return {prefix + k: draw(k, s).astype(np.float32) for k, s in shapes.items()}


def numpy_gpt2(t, x, c):
    """Independent numpy GPT-2 forward from HF-keyed tensors: ids [B, T] -> logits."""
    def ln(h, p):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(h.var(-1, keepdims=True) + c.layer_norm_epsilon) * t[p + ".weight"] + t[p + ".bias"]

    def lin(h, p):
        return h @ t[p + ".weight"] + t[p + ".bias"]

    gelu = lambda u: 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    n = x.shape[1]
    hd = c.n_embd // c.n_head
    h = t["wte.weight"][x] + t["wpe.weight"][:n]
    for i in range(c.n_layer):
        q, k, v = np.split(lin(ln(h, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, -1)
        out = np.zeros_like(q)
        for hh in range(c.n_head):
            sl = slice(hh * hd, (hh + 1) * hd)
            w = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / math.sqrt(hd)
            w = np.where(np.tril(np.ones((n, n), bool)), w, -np.inf)
            w = np.exp(w - w.max(-1, keepdims=True))
            out[..., sl] = (w / w.sum(-1, keepdims=True)) @ v[..., sl]
        h = h + lin(out, f"h.{i}.attn.c_proj")
        h = h + lin(gelu(lin(ln(h, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    return ln(h, "ln_f") @ t["wte.weight"].T


def write_hf_folder(path, c, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.n_positions,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
        "layer_norm_epsilon": c.layer_norm_epsilon}))


def test_weight_loading_round_trip(tmp_path):
    t = hf_tensors(CFG, prefix="transformer.")
    t["lm_head.weight"] = t["transformer.wte.weight"]
    write_hf_folder(tmp_path, CFG, t)
    w = load_gpt2_weights(str(tmp_path), n_aux_blocks=1)
    assert w.config == CFG
    t = {k.removeprefix("transformer."): v for k, v in t.items()}
    # every tensor in its place
    np.testing.assert_array_equal(w.client["wpe"], t["wpe.weight"])
    for part, blocks in ((w.client, [0]), (w.server, [1, 2])):
        for i in blocks:
            np.testing.assert_array_equal(part[f"h_{i}"]["c_attn_kernel"], t[f"h.{i}.attn.c_attn.weight"])
            np.testing.assert_array_equal(part[f"h_{i}"]["mlp_proj_bias"], t[f"h.{i}.mlp.c_proj.bias"])
            np.testing.assert_array_equal(part[f"h_{i}"]["ln_2_scale"], t[f"h.{i}.ln_2.weight"])
    np.testing.assert_array_equal(w.server["ln_f_bias"], t["ln_f.bias"])
    assert w.server["wte"] is w.client["wte"] and w.aux["wte"] is w.client["wte"]
    np.testing.assert_array_equal(w.client["wte"], t["wte.weight"])
    # logits of the split model (LoRA B = 0) equal an independent numpy GPT-2
    c, s, _ = init_split(SPLIT, jax.random.key(0))
    x = np.asarray(ids(7))
    _, logits = split_logits(c.with_frozen(w.client), s.with_frozen(w.server), x)
    np.testing.assert_allclose(logits, numpy_gpt2(t, x, CFG), rtol=1e-4, atol=1e-4)
    # init_split's frozen trees have exactly the loaded structure and shapes
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    assert shapes(c.frozen) == shapes(w.client) and shapes(s.frozen) == shapes(w.server)


def test_weight_loading_aux_lora_copies_blocks_after_cut():
    c = GPT2Config(**{**CFG.__dict__, "aux_mode": "lora"})
    t = hf_tensors(c)
    w = frozen_from_state_dict(t, c)
    np.testing.assert_array_equal(w.aux["h_1"]["c_fc_kernel"], t["h.1.mlp.c_fc.weight"])
    np.testing.assert_array_equal(w.aux["ln_f_scale"], t["ln_f.weight"])
    _, _, a = init_split(make_gpt2(c, T), jax.random.key(0))
    assert jax.tree.map(np.shape, a.frozen) == jax.tree.map(np.shape, w.aux)


def test_weight_loading_errors_name_the_key(tmp_path):
    t = hf_tensors(CFG)
    t["h.1.attn.c_attn.weight"] = t["h.1.attn.c_attn.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn\.weight"):
        frozen_from_state_dict(t, CFG)
    t = hf_tensors(CFG)
    del t["h.2.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match=r"h\.2\.mlp\.c_fc\.bias"):
        frozen_from_state_dict(t, CFG)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_gpt2_weights(str(tmp_path), CFG)
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_gpt2_weights(str(tmp_path / "absent"), CFG)
    assert "randomly initialised" in random_init_notice(CFG)



def test_weight_loading_refuses_aux_blocks_beyond_the_model():
    # aux_mode "lora" copies the pretrained blocks after the cut: 1 client + 3 aux > 3 blocks
    c = GPT2Config(**{**CFG.__dict__, "aux_mode": "lora", "n_aux_blocks": 3})
    with pytest.raises(ValueError, match=r"n_client_blocks \+ n_aux_blocks <= n_layer.*1 \+ 3"):
        frozen_from_state_dict(hf_tensors(CFG), c)
    # exactly up to the last block is fine: the aux model holds copies of blocks 1 and 2
    c = GPT2Config(**{**CFG.__dict__, "aux_mode": "lora", "n_aux_blocks": 2})
    t = hf_tensors(CFG)
    w = frozen_from_state_dict(t, c)
    np.testing.assert_array_equal(w.aux["h_2"]["c_fc_kernel"], t["h.2.mlp.c_fc.weight"])
    # aux_mode "full" copies no block (randomly initialised auxiliary blocks): no limit
    frozen_from_state_dict(t, GPT2Config(**{**CFG.__dict__, "aux_mode": "full", "n_aux_blocks": 3}))


def _hf_config(**fields):
    from transformers import GPT2Config as HFConfig
    return HFConfig(vocab_size=23, n_positions=12, n_embd=16, n_layer=3, n_head=2, **fields)


def test_config_from_hf_reads_the_shape():
    c = config_from_hf(_hf_config(layer_norm_epsilon=1e-6), n_aux_blocks=1)
    assert c == GPT2Config(vocab_size=23, n_positions=12, n_embd=16, n_layer=3, n_head=2,
                           layer_norm_epsilon=1e-6, n_aux_blocks=1)
    # the same computation under other names / in another order: accepted
    base = config_from_hf(_hf_config(), n_aux_blocks=1)
    for ok in [dict(activation_function="gelu_pytorch_tanh"), dict(activation_function="gelu_fast"),
               dict(n_inner=64), dict(reorder_and_upcast_attn=True), dict(resid_pdrop=0.0)]:
        assert config_from_hf(_hf_config(**ok), n_aux_blocks=1) == base, ok


@pytest.mark.parametrize("field, value", [
    ("activation_function", "gelu"),
    ("activation_function", "relu"),
    ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True),
    ("add_cross_attention", True),
    ("tie_word_embeddings", False),
    ("n_inner", 32),
])
def test_config_from_hf_refuses_what_it_cannot_compute(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is not supported"):
        config_from_hf(_hf_config(**{field: value}))


def test_read_config_refuses_from_config_json(tmp_path):
    # the path the CLI's --pretrained takes: a config.json with an unsupported field
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 23, "n_positions": 12, "n_embd": 16, "n_layer": 3,
         "n_head": 2, "activation_function": "gelu"}))
    with pytest.raises(ValueError, match=r"activation_function='gelu'"):
        read_config(str(tmp_path))


# ------------------------------------------------------------------- losses ----

def test_label_smoothed_loss_by_hand():
    # vocabulary 3, 3 positions; the first target is ignored (MR part)
    logits = jnp.array([[[9.0, 9.0, 9.0], [1.0, 2.0, 0.0], [0.0, 0.0, math.log(2.0)]]])
    y = jnp.array([[-1, 1, 2]])
    lse1, lse2 = math.log(math.e + math.e ** 2 + 1), math.log(4.0)
    nll = [lse1 - 2.0, lse2 - math.log(2.0)]
    smooth = [lse1 - 1.0, lse2 - math.log(2.0) / 3]      # mean over v of -log p_v
    tok = [0.9 * n + 0.1 * s for n, s in zip(nll, smooth)]
    np.testing.assert_allclose(lm_loss(logits, y, 0.1), [sum(tok) / 2], rtol=1e-6)
    np.testing.assert_allclose(lm_eval_loss(logits, y), [sum(nll) / 2], rtol=1e-6)
    # the split model's training loss smooths by 0.1, its eval loss does not
    np.testing.assert_allclose(SPLIT.loss(logits, y), [sum(tok) / 2], rtol=1e-6)
    np.testing.assert_allclose(SPLIT.eval_loss(logits, y), [sum(nll) / 2], rtol=1e-6)
    assert SPLIT == make_gpt2(CFG, T) and hash(SPLIT) == hash(make_gpt2(CFG, T))
    s, n = lm_loss_sums(logits, y)
    np.testing.assert_allclose(s, [sum(nll)], rtol=1e-6)
    np.testing.assert_array_equal(n, [2.0])
    # arg-max: position 1 -> 1 (right), position 2 -> 2 (right); then make one wrong
    np.testing.assert_allclose(lm_correct(logits, y), [1.0])
    np.testing.assert_allclose(lm_correct(logits, jnp.array([[-1, 0, 2]])), [0.5])
    # no counted token -> 0, not NaN
    np.testing.assert_array_equal(lm_loss(logits, jnp.full((1, 3), -1)), [0.0])
    np.testing.assert_array_equal(lm_correct(logits, jnp.full((1, 3), -1)), [0.0])


# --------------------------------------------------------------- generation ----

def test_greedy_generate_equals_step_by_step_argmax():
    # weights from HF-keyed tensors, so the independent numpy GPT-2 is the reference
    t = hf_tensors(CFG, seed=2)
    w = frozen_from_state_dict(t, CFG)
    split = SPLIT
    c, s, _ = init_split(split, jax.random.key(0))
    c, s = c.with_frozen(w.client), s.with_frozen(w.server)
    prompts = np.asarray(ids(8, b=3, t=4))
    lens = np.array([4, 2, 3])
    new = 5

    def reference(eos):
        out = []
        for r in range(3):
            seq, gen = list(prompts[r, :lens[r]]), []
            for _ in range(new):
                nxt = int(np.argmax(numpy_gpt2(t, np.array([seq]), CFG)[0, -1]))
                gen.append(nxt)
                if nxt == eos:
                    break
                seq.append(nxt)
            out.append(gen + [eos] * (new - len(gen)))
        return np.array(out)

    ref = reference(eos=-5)   # an id never produced: no early stop
    assert len(np.unique(ref)) > 2   # a non-trivial continuation
    got = greedy_generate(split, c, s, prompts, lens, new, eos_id=-5, batch_size=2)
    np.testing.assert_array_equal(got, ref)
    # stop at an end-of-text id the model does produce: row 0's third token
    eos = int(ref[0, 2])
    ref = reference(eos)
    got = greedy_generate(split, c, s, prompts, lens, new, eos_id=eos, batch_size=4)
    np.testing.assert_array_equal(got, ref)
    assert (got[0, 2:] == eos).all()


def test_corpus_bleu_multi_reference():
    import sacrebleu
    assert corpus_bleu(["the cat sat on the mat"], [["a dog", "the cat sat on the mat"]]) == pytest.approx(100.0)
    hyps = ["the cat is on the mat today", "there is a small dog here"]
    refs = [["the cat is on the mat", "a cat sits on the mat"], ["there is a dog here"]]
    want = sacrebleu.corpus_bleu(hyps, [["the cat is on the mat", "there is a dog here"],
                                        ["a cat sits on the mat", None]]).score
    assert corpus_bleu(hyps, refs) == pytest.approx(want)
    assert 0 < corpus_bleu(hyps, refs) < 100


# ---------------------------------------------------------------- tokenizer ----

def test_tokenizer_from_tiny_vocabulary(tmp_path):
    vocab = {"h": 0, "e": 1, "l": 2, "o": 3, "\u0120": 4, "w": 5, "r": 6, "d": 7, "he": 8, "ll": 9,
             "\u0120w": 10, "<|endoftext|>": 11}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nl l\n\u0120 w\n")
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("hello world") == [8, 9, 3, 10, 3, 6, 2, 7]
    assert tok.decode([8, 9, 3, 10, 3, 6, 2, 7]) == "hello world"
    assert tok.eos_token_id == 11 and len(tok) == 12
    assert decode_generated(tok, [[8, 9, 3, 11, 0]], eos_id=11) == ["hello"]


@pytest.mark.skipif(VOCAB is None, reason="no ../shared/data/gpt2-vocab")
def test_real_gpt2_vocabulary():
    tok = load_tokenizer(VOCAB)
    assert tok.encode("Hello world") == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256
