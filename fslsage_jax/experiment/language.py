"""GPT-2 (with LoRA) and E2E NLG as built-in task entries: the tokenizer, the model's shape,
pretrained weights, the end-of-run generation with corpus BLEU, and E2E's sizes.

Registered in :mod:`fslsage_jax.experiment.tasks` like the image models and datasets
(``BUILTIN_MODELS["gpt2"]``, ``BUILTIN_DATASETS["e2e"]``).
transformers / tensorflow-datasets stay lazy: they are imported inside the tokenizer and
E2E loaders of :mod:`fslsage_jax.models.gpt2_weights` and :mod:`fslsage_jax.data.e2e`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fslsage_jax.data import e2e
from fslsage_jax.experiment.errors import refusal
from fslsage_jax.lm import corpus_bleu, decode_generated, greedy_generate
from fslsage_jax.models import gpt2_weights
from fslsage_jax.models.gpt2 import GPT2_MEDIUM, GPT2_TINY, make_gpt2
from fslsage_jax.simulate import write_json_atomic

if TYPE_CHECKING:
    from fslsage_jax.experiment.config import ExperimentConfig

GPT2_SIZES = ("tiny", "medium")
# the settings only GPT-2 reads (e2e_splits is E2E's, but only GPT-2 reads E2E)
GPT2_FIELDS = ("gpt2_size", "pretrained", "tokenizer", "seq_len", "e2e_splits", "generate", "max_new_tokens")
# (the train, dev and test splits of E2E NLG: its sizes without loading it, for the memory plan)
E2E_SPLIT_SIZES = {"train": 42061, "dev": 4672, "test": 4693}


def gpt2_config(cfg: ExperimentConfig):
    """The GPT-2 shape: ``pretrained``'s config.json when it is a local folder, else ``gpt2_size``."""
    if cfg.pretrained and os.path.isdir(cfg.pretrained):
        try:
            return gpt2_weights.read_config(cfg.pretrained)
        except (OSError, ValueError, KeyError) as e:
            raise refusal("pretrained", cfg.pretrained, "cannot read its config.json ({})", e) from None
    return GPT2_TINY if cfg.gpt2_size == "tiny" else GPT2_MEDIUM


def tokenizer_name(cfg: ExperimentConfig) -> str:
    """The tokenizer's folder or hub name: ``tokenizer``, else ``pretrained``, else gpt2."""
    return cfg.tokenizer or cfg.pretrained or "gpt2"


def load_tokenizer(cfg: ExperimentConfig):
    """The GPT-2 tokenizer E2E is encoded with (``tokenizer``, else ``pretrained``, else gpt2)."""
    name = tokenizer_name(cfg)
    try:
        return gpt2_weights.load_tokenizer(name)
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, ...)
        raise refusal("tokenizer", name, "cannot load a GPT-2 tokenizer ({}: {}); pass a folder with "
                      "vocab.json and merges.txt, or a hub name when online", type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "") from None


def make_split(cfg: ExperimentConfig, input_shape: tuple, num_classes: int):
    """GPT-2 of :func:`gpt2_config` over ``seq_len`` tokens (the input shape is ``(seq_len,)``)."""
    try:
        return make_gpt2(gpt2_config(cfg), cfg.seq_len)
    except ValueError as e:
        raise refusal("seq_len", cfg.seq_len, "{}", e) from None


def extras(cfg: ExperimentConfig, ds, split, tok, log=None, echo=None):
    """``(frozen weights or None, generation hook or None)``; ``log`` gets the notice about
    random weights, ``echo`` the generated samples and BLEU."""
    if ds.num_classes > split.num_classes:
        raise refusal("tokenizer", tokenizer_name(cfg), "vocabulary of {} tokens is larger than the model's {}",
                      ds.num_classes, split.num_classes)
    config = gpt2_config(cfg)
    frozen = None
    if cfg.pretrained:
        try:
            w = gpt2_weights.load_gpt2_weights(cfg.pretrained, config)
        except (OSError, ValueError, KeyError) as e:
            raise refusal("pretrained", cfg.pretrained, "{}", e) from None
        frozen = (w.client, w.server, w.aux)
    elif log is not None:
        log(gpt2_weights.random_init_notice(config))
    on_finish = make_generation_hook(cfg, ds, split, tok, echo) if cfg.generate else None
    return frozen, on_finish


def make_generation_hook(cfg: ExperimentConfig, ds, split, tok, echo=None):
    """``on_finish(algo, state)``: greedy decoding of ``generate`` evaluation MRs, corpus BLEU
    against all their references; ``echo`` gets a few samples and the BLEU line; writes
    generations.json into the run directory."""
    say = echo or (lambda msg: None)

    def on_finish(algo, state):
        n = min(cfg.generate, len(ds.test_mrs))
        mrs, refs = ds.test_mrs[:n], ds.test_refs[:n]
        width = cfg.seq_len - cfg.max_new_tokens
        if width < 1:
            return {"bleu": None, "generate_error": "max_new_tokens leaves no room for a prompt"}
        prompts, lens = e2e.encode_prompts(tok, mrs, width)
        cv, sv = algo.global_model(state)
        tokens = greedy_generate(split, cv, sv, prompts, lens, cfg.max_new_tokens, ds.eos_id)
        hyps = decode_generated(tok, tokens, ds.eos_id)
        bleu = corpus_bleu(hyps, refs)
        for mr, h in list(zip(mrs, hyps))[:3]:
            say(f"  MR: {mr}\n  -> {h}")
        say(f"BLEU on {n} evaluation meaning representations: {bleu:.2f}")
        if cfg.out:
            run_dir = os.path.join(cfg.out, algo.name) if cfg.algo == "all" else cfg.out
            write_json_atomic(os.path.join(run_dir, "generations.json"),
                              [{"mr": m, "hypothesis": h, "references": r}
                               for m, h, r in zip(mrs, hyps, refs)])
        return {"bleu": bleu, "generated": n}
    return on_finish


def check_effective(cfg: ExperimentConfig, explicit: set) -> None:
    """GPT-2's own settings that cannot have an effect with the others."""
    if "max_new_tokens" in explicit and not cfg.generate:
        raise refusal("max_new_tokens", cfg.max_new_tokens, "only with {generate}")
    if "gpt2_size" in explicit and cfg.pretrained and os.path.isdir(cfg.pretrained):
        raise refusal("gpt2_size", cfg.gpt2_size, "the shape comes from {pretrained} {}'s config.json",
                      cfg.pretrained)


def load_e2e(cfg: ExperimentConfig, tok):
    """E2E token arrays of the ``e2e_splits`` (train, evaluation), encoded with ``tok``."""
    train_split, eval_split = cfg.e2e_splits.split(",")
    try:
        return e2e.load_e2e(tok, cfg.data_dir, cfg.seq_len, train_split=train_split, eval_split=eval_split)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise refusal("data_dir", cfg.data_dir, "cannot load E2E ({}: {})", type(e).__name__, e) from None


def e2e_shape(cfg: ExperimentConfig) -> tuple[tuple[int, ...], int]:
    """``((seq_len,), 0)``: token sequences; the vocabulary is the tokenizer's (not loaded here)."""
    return (cfg.seq_len,), 0


def e2e_sizes(cfg: ExperimentConfig) -> tuple[int, int]:
    """(train, evaluation) samples of the ``e2e_splits``, without loading them."""
    train_split, eval_split = cfg.e2e_splits.split(",")
    return E2E_SPLIT_SIZES[train_split], E2E_SPLIT_SIZES[eval_split]
