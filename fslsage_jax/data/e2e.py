"""E2E NLG (Novikova et al. 2017) as token arrays for a causal language model.

Sources: the original CSV release in a data folder (``trainset.csv``,
``devset.csv``, ``testset_w_refs.csv``; columns ``mr,ref``; one row per
reference, so a meaning representation (MR) with several references spans
several rows), or tensorflow-datasets ``gem/e2e_nlg`` (GEM's cleaned E2E; lazy
import, fails in about 3 s when it is not prepared and the network is down).

Encoding of one (MR, reference) row, as in the LoRA GPT-2 recipe::

    s = tok(mr) + tok(" |||") + tok(" " + ref) + [eot]
    x = s[:-1], y = s[1:]   (next-token targets)

``y`` is ``IGNORE = -1`` where the target is part of the MR or the separator, so
the loss counts exactly the reference tokens and the final end-of-text token;
both are right-padded (``x`` with eot, ``y`` with -1) or truncated to ``seq_len``.
A generation prompt is ``tok(mr) + tok(" |||")``.
"""
from __future__ import annotations

import csv
import os
from typing import Any, NamedTuple

import numpy as np

SEPARATOR = " |||"
IGNORE = -1
FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
TFDS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
_HOW = ("E2E NLG: put the original CSV release (trainset.csv, devset.csv, testset_w_refs.csv with "
        "columns mr,ref) in --data-dir, or use tensorflow-datasets 'gem/e2e_nlg' (needs "
        "`pip install tensorflow-datasets tensorflow` and the network or a prepared copy)")


class E2EData(NamedTuple):
    """E2E token arrays; the first six fields match :class:`fslsage_jax.data.sources.Dataset`.

    ``x_*``: ``[N, T]`` int32 inputs, ``y_*``: ``[N, T]`` int32 next-token targets (-1 = not
    counted), ``num_classes``: vocabulary size, ``test_mrs``/``test_refs``: the evaluation
    split's unique MRs (first-seen order) and all references of each, ``eos_id``: end of text.
    """
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    test_mrs: list
    test_refs: list
    eos_id: int


def read_e2e_csv(path: str) -> list[tuple[str, str]]:
    """Rows ``(mr, ref)`` of one E2E CSV file (header ``mr,ref``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {path}. {_HOW}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns mr,ref, got {reader.fieldnames}")
        return [(r["mr"], r["ref"]) for r in reader]


def encode_pair(tokenizer, mr: str, ref: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One row -> ``(x [seq_len], y [seq_len])`` int32 (see the module docstring)."""
    eos = tokenizer.eos_token_id
    ctx = tokenizer.encode(mr) + tokenizer.encode(SEPARATOR)
    s = ctx + tokenizer.encode(" " + ref) + [eos]
    y = np.array(s[1:], np.int64)
    y[:len(ctx) - 1] = IGNORE
    x = np.full(seq_len, eos, np.int32)
    yy = np.full(seq_len, IGNORE, np.int32)
    n = min(seq_len, len(s) - 1)
    x[:n], yy[:n] = s[:n], y[:n]
    return x, yy


def encode_rows(tokenizer, rows: list[tuple[str, str]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(mr, ref)`` -> ``x, y`` ``[N, seq_len]`` int32."""
    if not rows:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    xs, ys = zip(*(encode_pair(tokenizer, mr, ref, seq_len) for mr, ref in rows))
    return np.stack(xs), np.stack(ys)


def group_references(rows: list[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Unique MRs in first-seen order and the list of all references of each."""
    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    return list(refs), list(refs.values())


def encode_prompts(tokenizer, mrs: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Generation prompts ``tok(mr) + tok(" |||")``: ``[N, seq_len]`` int32 (eot-padded,
    truncated to ``seq_len``) and their lengths ``[N]``."""
    eos = tokenizer.eos_token_id
    out = np.full((len(mrs), seq_len), eos, np.int32)
    lens = np.zeros(len(mrs), np.int32)
    for i, mr in enumerate(mrs):
        p = (tokenizer.encode(mr) + tokenizer.encode(SEPARATOR))[:seq_len]
        out[i, :len(p)], lens[i] = p, len(p)
    return out, lens


def _network_available(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """A TCP connection opens within ``timeout`` (False when ``FSLSAGE_OFFLINE`` is set)."""
    import socket
    if os.environ.get("FSLSAGE_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_e2e_tfds(split: str, data_dir: str | None = None) -> list[tuple[str, str]]:
    """Rows ``(mr, target)`` of tensorflow-datasets ``gem/e2e_nlg`` (``split``: train, dev, test).

    Fails fast (about 3 s) with a one-line error when the package (or TensorFlow, which
    the GEM builder imports) is missing, or the dataset is not prepared in ``data_dir`` and storage.googleapis.com is unreachable
    (instead of tfds's long download retry loop).
    """
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)      # tfds warns on absent folders: one-line errors
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise FileNotFoundError(f"tensorflow-datasets is not installed. {_HOW}") from e
    try:
        builder = tfds.builder("gem/e2e_nlg", data_dir=data_dir)
    except (ImportError, ValueError) as e:  # e.g. the gem builder needs TensorFlow (DatasetNotFoundError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"tensorflow-datasets cannot build gem/e2e_nlg ({type(e).__name__}: "
                                f"{first}). {_HOW}") from None
    prepared = os.path.exists(os.path.join(str(builder.data_dir), "dataset_info.json"))
    if not prepared:
        if not _network_available():
            raise FileNotFoundError(f"gem/e2e_nlg is not prepared in {builder.data_dir} and the network "
                                    f"is unreachable. {_HOW}")
        builder.download_and_prepare()
    ds = tfds.as_numpy(builder.as_dataset(split=TFDS_SPLITS[split]))
    dec = lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b)
    return [(dec(r["meaning_representation"]), dec(r["target"])) for r in ds]


def read_e2e(split: str, data_dir: str | None, source: str = "auto") -> list[tuple[str, str]]:
    """Rows ``(mr, ref)`` of one split (``train``, ``dev`` or ``test``).

    ``source``: ``"csv"`` (``data_dir/FILES[split]``), ``"tfds"``, or ``"auto"`` (the CSV
    file when ``data_dir`` has it, else tfds).
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    path = os.path.join(data_dir or ".", FILES[split])
    if source == "csv" or (source == "auto" and data_dir and os.path.exists(path)):
        return read_e2e_csv(path)
    if source in ("tfds", "auto"):
        try:
            return read_e2e_tfds(split, data_dir)
        except FileNotFoundError as e:
            if source == "auto":
                raise FileNotFoundError(f"no file {path} and {e}") from None
            raise
    raise ValueError(f"source must be 'auto', 'csv' or 'tfds', got {source!r}")


def load_e2e(tokenizer: Any, data_dir: str | None = None, seq_len: int = 512, source: str = "auto",
             train_split: str = "train", eval_split: str = "dev", max_rows: int | None = None) -> E2EData:
    """E2E NLG train and evaluation arrays plus the evaluation MRs with their references.

    Args:
      tokenizer: a GPT-2 tokenizer (``encode``, ``eos_token_id``, ``len``).
      data_dir: folder of the CSV release (or tfds data folder).
      seq_len: tokens per sample (pad/truncate).
      source: ``"auto"``, ``"csv"`` or ``"tfds"`` (see :func:`read_e2e`).
      train_split, eval_split: which splits (``train``, ``dev``, ``test``) to use. Training
        always reads ``train_split``; a missing ``trainset.csv`` is an error, never a silent
        fallback (pass ``train_split="dev"`` explicitly to train on the dev set).
      max_rows: keep only the first rows of each split (quick runs).
    Returns:
      :class:`E2EData`.
    """
    tr = read_e2e(train_split, data_dir, source)[:max_rows]
    ev = read_e2e(eval_split, data_dir, source)[:max_rows]
    x_tr, y_tr = encode_rows(tokenizer, tr, seq_len)
    x_ev, y_ev = encode_rows(tokenizer, ev, seq_len)
    mrs, refs = group_references(ev)
    return E2EData("e2e", x_tr, y_tr, x_ev, y_ev, len(tokenizer), mrs, refs, int(tokenizer.eos_token_id))


__all__ = [
    "FILES",
    "IGNORE",
    "SEPARATOR",
    "E2EData",
    "encode_pair",
    "encode_prompts",
    "encode_rows",
    "group_references",
    "load_e2e",
    "read_e2e",
    "read_e2e_csv",
    "read_e2e_tfds",
]
