"""E2E NLG loader: encoding and loss mask by hand, CSV parsing and reference grouping,
fast clear failures, and (when the shared data exists) real rows that decode back."""
import csv
import os
import time

import numpy as np
import pytest

from fslsage_jax.data.e2e import (
    encode_pair,
    encode_prompts,
    group_references,
    load_e2e,
    read_e2e,
    read_e2e_csv,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = next((p for p in (os.path.join(ROOT, "..", "shared", "data"), "/work/shared/data")
               if os.path.exists(os.path.join(p, "e2e", "devset.csv"))
               and os.path.exists(os.path.join(p, "gpt2-vocab", "vocab.json"))), None)


class CharTokenizer:
    """One token per character (its code point); end of text = 0."""
    eos_token_id = 0

    def encode(self, s):
        return [ord(ch) for ch in s]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def __len__(self):
        return 256


TOK = CharTokenizer()


def test_encode_pair_by_hand():
    x, y = encode_pair(TOK, "ab", "cd", seq_len=12)
    s = [ord(ch) for ch in "ab |||"] + [ord(ch) for ch in " cd"] + [0]   # 10 tokens
    np.testing.assert_array_equal(x, s[:9] + [0, 0, 0])
    # the first 5 targets (b, ' ', '|', '|', '|') are MR/separator; then ' ', c, d, eot; then padding
    np.testing.assert_array_equal(y, [-1] * 5 + [ord(" "), ord("c"), ord("d"), 0] + [-1] * 3)
    assert x.dtype == y.dtype == np.int32
    # truncation keeps the first seq_len tokens; the counted ones are still the text's
    x, y = encode_pair(TOK, "ab", "cd", seq_len=7)
    np.testing.assert_array_equal(x, s[:7])
    np.testing.assert_array_equal(y, [-1] * 5 + [ord(" "), ord("c")])
    # an MR longer than seq_len: nothing counts
    _, y = encode_pair(TOK, "a" * 20, "cd", seq_len=7)
    assert (y == -1).all()


def write_csv(path, rows, quote_all=False):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
        w.writerow(["mr", "ref"])
        w.writerows(rows)


ROWS = [("name[A], food[Thai]", "A serves Thai food."), ("name[A], food[Thai]", "Thai food, at A."),
        ("name[B]", "B, a pub.")]


def test_csv_reading_grouping_and_prompts(tmp_path):
    write_csv(tmp_path / "devset.csv", ROWS, quote_all=True)
    rows = read_e2e_csv(str(tmp_path / "devset.csv"))
    assert rows == ROWS
    mrs, refs = group_references(rows)
    assert mrs == ["name[A], food[Thai]", "name[B]"]
    assert refs == [["A serves Thai food.", "Thai food, at A."], ["B, a pub."]]
    p, n = encode_prompts(TOK, mrs, seq_len=25)
    np.testing.assert_array_equal(n, [len("name[A], food[Thai] |||"), len("name[B] |||")])
    assert TOK.decode(p[1, :n[1]]) == "name[B] |||" and (p[1, n[1]:] == 0).all()


def test_load_e2e_from_csv_folder(tmp_path):
    write_csv(tmp_path / "trainset.csv", ROWS[:2])
    write_csv(tmp_path / "devset.csv", ROWS)
    d = load_e2e(TOK, str(tmp_path), seq_len=40)
    assert d.x_train.shape == (2, 40) and d.x_test.shape == (3, 40) and d.num_classes == 256
    assert d.test_mrs == ["name[A], food[Thai]", "name[B]"] and d.eos_id == 0
    counted = d.y_test[2][d.y_test[2] >= 0]
    assert TOK.decode(counted) == " B, a pub.\x00"
    # no trainset.csv: a one-line error naming the path and both ways, not a silent fallback
    os.remove(tmp_path / "trainset.csv")
    with pytest.raises(FileNotFoundError) as e:
        load_e2e(TOK, str(tmp_path), seq_len=40, source="csv")
    msg = str(e.value)
    assert str(tmp_path / "trainset.csv") in msg and "gem/e2e_nlg" in msg and "\n" not in msg
    d = load_e2e(TOK, str(tmp_path), seq_len=40, train_split="dev")
    np.testing.assert_array_equal(d.x_train, d.x_test)


def test_missing_data_fails_fast_and_names_both_ways(tmp_path):
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e:
        read_e2e("train", str(tmp_path / "nothing"), source="auto")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "trainset.csv" in msg and "gem/e2e_nlg" in msg and "--data-dir" in msg
    with pytest.raises(ValueError, match="split"):
        read_e2e("validation", str(tmp_path))


@pytest.mark.skipif(SHARED is None, reason="no ../shared/data/e2e and gpt2-vocab")
def test_real_rows_encode_decode_and_mask_covers_the_text():
    from fslsage_jax.models.gpt2_weights import load_tokenizer
    tok = load_tokenizer(os.path.join(SHARED, "gpt2-vocab"))
    e2e = os.path.join(SHARED, "e2e")
    dev = read_e2e_csv(os.path.join(e2e, "devset.csv"))
    test_rows = read_e2e_csv(os.path.join(e2e, "testset_w_refs.csv"))
    assert (len(dev), len(group_references(dev)[0])) == (4672, 547)
    assert (len(test_rows), len(group_references(test_rows)[0])) == (4693, 630)
    d = load_e2e(tok, e2e, seq_len=128, train_split="dev", eval_split="test", max_rows=300)
    assert d.x_train.shape == (300, 128) and d.num_classes == 50257 and d.eos_id == 50256
    for i in range(0, 300, 7):
        mr, ref = test_rows[i]
        x, y = d.x_test[i], d.y_test[i]
        n = int((y >= 0).sum())
        last = int(np.nonzero(y >= 0)[0][-1])
        # counted targets are exactly " " + ref followed by end of text, contiguous at the end
        assert y[last] == tok.eos_token_id and (y[last - n + 1:last + 1] >= 0).all()
        assert tok.decode(y[y >= 0][:-1]) == " " + ref
        # the input decodes back to "MR ||| ref"
        assert tok.decode(x[:last + 1]) == mr + " ||| " + ref
        assert (x[last + 1:] == tok.eos_token_id).all()
