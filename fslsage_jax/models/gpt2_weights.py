"""Hugging Face GPT-2 weights and tokenizer for the split Flax GPT-2.

Weights come from a folder with ``model.safetensors`` (and ``config.json``) or from
the hub by name (``huggingface_hub.snapshot_download``, only when online). Key
names are Hugging Face's (``wte.weight``, ``h.{i}.attn.c_attn.weight``, ...,
optionally prefixed ``transformer.``); ``Conv1D`` kernels are already ``[in, out]``
so they are used as they are. ``lm_head.weight`` is tied to ``wte`` and ignored.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, NamedTuple

import numpy as np

from fslsage_jax.models.gpt2 import GPT2Config, config_from_hf

# Our block variable -> Hugging Face key suffix inside ``h.{i}.``.
BLOCK_KEYS = {
    "ln_1_scale": "ln_1.weight", "ln_1_bias": "ln_1.bias",
    "c_attn_kernel": "attn.c_attn.weight", "c_attn_bias": "attn.c_attn.bias",
    "attn_proj_kernel": "attn.c_proj.weight", "attn_proj_bias": "attn.c_proj.bias",
    "ln_2_scale": "ln_2.weight", "ln_2_bias": "ln_2.bias",
    "c_fc_kernel": "mlp.c_fc.weight", "c_fc_bias": "mlp.c_fc.bias",
    "mlp_proj_kernel": "mlp.c_proj.weight", "mlp_proj_bias": "mlp.c_proj.bias",
}


class GPT2Weights(NamedTuple):
    """Frozen collections of the three parts (the same ``wte`` array in all three)."""
    config: GPT2Config
    client: dict
    server: dict
    aux: dict


def random_init_notice(config: GPT2Config) -> str:
    """The one-line notice to print when no pretrained weights are given."""
    return (f"notice: no --pretrained weights: GPT-2 ({config.n_layer} blocks, width {config.n_embd}) "
            f"is randomly initialised (normal {config.initializer_range}); results are not those "
            f"of pretrained GPT-2")


def _block_shapes(d: int) -> dict[str, tuple]:
    return {"ln_1_scale": (d,), "ln_1_bias": (d,), "c_attn_kernel": (d, 3 * d), "c_attn_bias": (3 * d,),
            "attn_proj_kernel": (d, d), "attn_proj_bias": (d,), "ln_2_scale": (d,), "ln_2_bias": (d,),
            "c_fc_kernel": (d, 4 * d), "c_fc_bias": (4 * d,), "mlp_proj_kernel": (4 * d, d),
            "mlp_proj_bias": (d,)}


def frozen_from_state_dict(tensors: dict[str, Any], config: GPT2Config) -> GPT2Weights:
    """Hugging Face GPT-2 tensors (numpy, HF key names) -> the parts' frozen collections.

    Args:
      tensors: ``{key: array}``; keys may carry a ``transformer.`` prefix; attention
        mask buffers (``attn.bias``, ``attn.masked_bias``) and ``lm_head.weight`` are ignored.
      config: the model shape to check against.
    Returns:
      :class:`GPT2Weights`. ``aux`` holds ``wte`` and, for ``aux_mode="lora"``, copies of
      the pretrained blocks ``n_client_blocks..n_client_blocks+n_aux_blocks-1`` and ``ln_f``.
    Raises:
      KeyError naming a missing key; ValueError naming a key whose shape is wrong, or
      (``aux_mode="lora"``) when ``n_client_blocks + n_aux_blocks > n_layer``: there are not
      enough pretrained blocks after the cut to copy into the auxiliary model.
    """
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    c, d = config, config.n_embd
    if c.aux_mode == "lora" and c.n_client_blocks + c.n_aux_blocks > c.n_layer:
        raise ValueError(
            f"GPT-2 weights: the auxiliary model copies the pretrained blocks after the cut, "
            f"{c.n_client_blocks}..{c.n_client_blocks + c.n_aux_blocks - 1}, but the model has "
            f"n_layer={c.n_layer} blocks: need n_client_blocks + n_aux_blocks <= n_layer "
            f"(got {c.n_client_blocks} + {c.n_aux_blocks})")

    def get(key, shape):
        if key not in t:
            raise KeyError(f"GPT-2 weights: missing key {key!r} (have e.g. {sorted(t)[:4]})")
        a = np.asarray(t[key])
        if a.shape != tuple(shape):
            raise ValueError(f"GPT-2 weights: {key!r} has shape {a.shape}, the model expects "
                             f"{tuple(shape)}")
        return np.asarray(a, np.float32)

    def block(i):
        return {ours: get(f"h.{i}.{hf}", _block_shapes(d)[ours]) for ours, hf in BLOCK_KEYS.items()}

    wte = get("wte.weight", (c.vocab_size, d))
    ln_f = {"ln_f_scale": get("ln_f.weight", (d,)), "ln_f_bias": get("ln_f.bias", (d,))}
    if f"h.{c.n_layer}.ln_1.weight" in t:
        raise ValueError(f"GPT-2 weights have more than n_layer={c.n_layer} blocks "
                         f"(found key 'h.{c.n_layer}.ln_1.weight')")
    client = {"wte": wte, "wpe": get("wpe.weight", (c.n_positions, d)),
              **{f"h_{i}": block(i) for i in range(c.n_client_blocks)}}
    server = {"wte": wte, **ln_f, **{f"h_{i}": block(i) for i in range(c.n_client_blocks, c.n_layer)}}
    aux = {"wte": wte}
    if c.aux_mode == "lora":
        first = c.n_client_blocks
        aux.update(ln_f)
        aux.update({f"h_{i}": block(i) for i in range(first, first + c.n_aux_blocks)})
    return GPT2Weights(config, client, server, aux)


def network_available(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(path_or_name: str, patterns: tuple = ("*.json", "*.safetensors", "merges.txt",
                                                              "vocab.json")) -> str:
    """A local folder: ``path_or_name`` itself if it is a folder, else a hub snapshot.

    Raises:
      FileNotFoundError (fast, about 3 s) when it is not a folder and the hub is unreachable.
    """
    if os.path.isdir(path_or_name):
        return path_or_name
    if path_or_name.startswith(("/", ".", "~")) or os.path.exists(path_or_name):
        raise FileNotFoundError(f"GPT-2: no folder {path_or_name!r}")
    if not network_available():
        raise FileNotFoundError(f"GPT-2: {path_or_name!r} is not a local folder and the Hugging Face hub "
                                f"is unreachable (offline); give a folder with model.safetensors, "
                                f"config.json, vocab.json and merges.txt")
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_name, allow_patterns=list(patterns))


def read_config(folder: str, **overrides) -> GPT2Config:
    """:class:`GPT2Config` from ``folder/config.json`` via ``transformers.GPT2Config``."""
    from transformers import GPT2Config as HFConfig
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"GPT-2: no config.json in {folder!r}")
    with open(path) as f:
        hf = HFConfig(**json.load(f))
    return config_from_hf(hf, **overrides)


def load_gpt2_weights(path_or_name: str, config: GPT2Config | None = None, **overrides) -> GPT2Weights:
    """Load Hugging Face GPT-2 weights into the split model's frozen collections.

    Args:
      path_or_name: a folder with ``model.safetensors`` (+ ``config.json``) or a hub name
        (``"gpt2-medium"``; downloaded only when online).
      config: the model to load into; None: read from the folder's ``config.json``
        (with ``overrides``, e.g. ``n_aux_blocks=3``).
    Returns:
      :class:`GPT2Weights` ``(config, client, server, aux)``: put them in ``Vars.frozen``
      (``v.with_frozen(w.client)`` etc.).
    Raises:
      FileNotFoundError: no weights file / unreachable hub; KeyError/ValueError: a key is
      missing or has the wrong shape (the message names it).
    """
    folder = resolve_pretrained(path_or_name)
    if config is None:
        config = read_config(folder, **overrides)
    st = os.path.join(folder, "model.safetensors")
    if not os.path.exists(st):
        if os.path.exists(os.path.join(folder, "pytorch_model.bin")):
            raise FileNotFoundError(
                f"GPT-2: {folder!r} has only pytorch_model.bin, which needs torch to read; convert it "
                f"to model.safetensors (e.g. with torch: safetensors.torch.save_file(torch.load(...)))")
        raise FileNotFoundError(f"GPT-2: no model.safetensors in {folder!r}")
    from safetensors.numpy import load_file
    return frozen_from_state_dict(load_file(st), config)


def load_tokenizer(path_or_name: str):
    """``transformers.GPT2TokenizerFast`` from a folder (``tokenizer.json``, or
    ``vocab.json`` + ``merges.txt``) or a hub name (only when online)."""
    from transformers import GPT2TokenizerFast
    folder = resolve_pretrained(path_or_name, ("tokenizer.json", "vocab.json", "merges.txt", "*.json"))
    has = lambda f: os.path.exists(os.path.join(folder, f))
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise FileNotFoundError(f"GPT-2 tokenizer: {folder!r} has neither tokenizer.json nor "
                                f"vocab.json + merges.txt")
    # from_pretrained on a local folder is offline and reads either layout (transformers 4 and 5)
    return GPT2TokenizerFast.from_pretrained(folder)

__all__ = [
    "BLOCK_KEYS",
    "GPT2Weights",
    "frozen_from_state_dict",
    "load_gpt2_weights",
    "load_tokenizer",
    "network_available",
    "random_init_notice",
    "read_config",
    "resolve_pretrained",
]
