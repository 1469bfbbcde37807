"""Tests for experiments/data.py: corpus split, vocabulary, windows, digits."""

import ast
import hashlib
import io
import re
import tokenize

import numpy as np
import pytest

from experiments import data as D

SNIPPET = '''#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""Module doc: a résumé of things."""

import os  # trailing comment about os

X = "# not a comment"
Y = """keep
   # this too, it is a string   

"""


def f():
    """Only a docstring."""


def g(): "one-liner doc"; return 1


class C:
    \'\'\'Class doc.\'\'\'

    # comment block line one
    # line two
    def m(self):
        return X  # why X
'''


def _comments(code):
  return [t for t in tokenize.generate_tokens(io.StringIO(code).readline)
          if t.type == tokenize.COMMENT]


def _docstrings(code):
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  return [n for n in ast.walk(ast.parse(code))
          if isinstance(n, kinds) and ast.get_docstring(n, clean=False) is not None]


def _strip_docstrings(tree):
  # Independent reference: what the AST should be once docstrings are gone.
  kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  for n in ast.walk(tree):
    if isinstance(n, kinds) and ast.get_docstring(n, clean=False) is not None:
      n.body = n.body[1:] or [ast.Pass()]
  return tree


@pytest.fixture(scope="module")
def corpus():
  return D.stdlib_corpus()


# --- split_source ----------------------------------------------------------


def test_split_source_code_has_no_comments_or_docstrings():
  code, _ = D.split_source(SNIPPET)
  assert _comments(code) == []
  assert _docstrings(code) == []


def test_split_source_keeps_semantics_and_strings():
  code, _ = D.split_source(SNIPPET)
  expected = ast.dump(_strip_docstrings(ast.parse(SNIPPET)))
  assert ast.dump(ast.parse(code)) == expected
  # String contents, including '#' and trailing spaces, survive verbatim.
  assert 'X = "# not a comment"' in code
  assert '   # this too, it is a string   \n\n"""' in code
  assert "def f():\n    pass\n" in code
  assert "import os\n" in code  # trailing comment and its spaces gone


def test_split_source_prose_collects_docstrings_and_comments_in_order():
  _, prose = D.split_source(SNIPPET)
  paragraphs = prose.strip().split("\n\n")
  assert paragraphs == [
      "Module doc: a résumé of things.",
      "trailing comment about os",
      "Only a docstring.",
      "one-liner doc",
      "Class doc.",
      "comment block line one\nline two",
      "why X",
  ]
  assert "usr/bin" not in prose and "coding" not in prose


def test_split_source_rejects_invalid_python():
  with pytest.raises(SyntaxError):
    D.split_source("def f(:\n")


# --- stdlib corpus ---------------------------------------------------------


def test_corpus_code_is_comment_free_python(corpus):
  code = corpus.code_heldout
  assert len(code) > 10_000
  assert _comments(code) == []
  assert _docstrings(code) == []


def test_corpus_code_matches_source_files(corpus):
  # Re-derive a few files independently: their code must parse to the
  # original AST minus docstrings.
  files = dict(D.stdlib_files())
  for rel in corpus.heldout_files[:15]:
    src = files[rel].read_text(encoding="utf-8")
    code, _ = D.split_source(src)
    assert ast.dump(ast.parse(code)) == ast.dump(_strip_docstrings(ast.parse(src)))
    assert code in corpus.code_heldout


def test_corpus_prose_is_words(corpus):
  for prose in (corpus.prose_train, corpus.prose_heldout):
    words = re.findall(r"[A-Za-z]{2,}", prose)
    assert len(words) > 5_000
    # Real English prose: "the" is among the most common words.
    assert sum(w.lower() == "the" for w in words) > len(words) / 50
  assert len(corpus.prose_train) > 5 * len(corpus.prose_heldout) > 0


def test_corpus_split_is_disjoint_and_hash_based(corpus):
  train, held = set(corpus.train_files), set(corpus.heldout_files)
  assert not train & held
  assert len(train) + len(held) == corpus.n_files > 200
  assert 0.05 < len(held) / corpus.n_files < 0.15
  for rel in corpus.heldout_files + corpus.train_files[:50]:
    first = hashlib.sha256(rel.encode()).digest()[0]
    assert (rel in held) == (first < 26)
  assert list(corpus.train_files) == sorted(corpus.train_files)


def test_corpus_skips_excluded_directories(corpus):
  banned = {"site-packages", "test", "tests", "idlelib", "lib2to3", "encodings"}
  for rel in corpus.train_files + corpus.heldout_files:
    assert not banned & set(rel.split("/")[:-1]), rel


def test_corpus_sha256_is_digest_of_raw_files(corpus):
  files = dict(D.stdlib_files())
  h = hashlib.sha256()
  for rel in sorted(corpus.train_files + corpus.heldout_files):
    for field in (rel.encode(), files[rel].read_bytes()):
      h.update(len(field).to_bytes(8, "little"))
      h.update(field)
  assert corpus.sha256 == h.hexdigest()


def test_corpus_file_split_is_stable(corpus):
  # A fresh directory walk reproduces the same partition, and no stdlib
  # file of the running Python was dropped as unparsable.
  rels = [rel for rel, _ in D.stdlib_files()]
  assert rels == sorted(rels)
  assert corpus.heldout_files == tuple(r for r in rels if D.is_heldout(r))
  assert corpus.train_files == tuple(r for r in rels if not D.is_heldout(r))


def test_corpus_build_is_deterministic_and_max_chars_truncates():
  # A sub-tree keeps this fast; the code path is the same as the full build.
  import sysconfig
  from pathlib import Path

  root = Path(sysconfig.get_paths()["stdlib"]) / "email"
  a = D.stdlib_corpus(root=root)
  b = D.stdlib_corpus(root=root)
  small = D.stdlib_corpus(max_chars=2_000, root=root)
  assert a == b
  assert small.sha256 == a.sha256 and small.heldout_files == a.heldout_files
  for field in ("code_train", "code_heldout", "prose_train", "prose_heldout"):
    full = getattr(a, field)
    assert len(full) > 2_000
    assert getattr(small, field) == full[:2_000]


# --- vocabulary ------------------------------------------------------------


def test_ascii_vocab_round_trip_and_unk():
  v = D.CharVocab.ascii()
  assert v.size == 98 and v.unk_id == 97
  text = "def f(x):\n\treturn x + 1  # ~{}|\\'\""
  ids = v.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert ids.max() < v.unk_id
  assert v.decode(ids) == text
  odd = v.encode("aé\x00b")
  assert odd.tolist() == [v.encode("a")[0], v.unk_id, v.unk_id, v.encode("b")[0]]
  assert v.decode(odd) == "a" + v.unk_char * 2 + "b"
  with pytest.raises(ValueError):
    v.decode([v.size])


def test_ascii_vocab_ids_are_code_point_ordered():
  v = D.CharVocab.ascii()
  expected = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
  assert [v.decode([i]) for i in range(97)] == expected


def test_vocab_from_text():
  v = D.CharVocab.from_text("banana!")
  assert v.chars == "!abn" and v.size == 5
  assert v.encode("nab?").tolist() == [3, 1, 2, 4]
  assert v.decode(v.encode("banana")) == "banana"


def test_corpus_is_almost_all_ascii(corpus):
  v = D.CharVocab.ascii()
  ids = v.encode(corpus.code_heldout + corpus.prose_heldout)
  assert np.mean(ids == v.unk_id) < 1e-3


# --- windows ---------------------------------------------------------------


def test_char_batches_are_shifted_contiguous_windows():
  ids = np.arange(1000, dtype=np.int32)
  it = D.char_batches(ids, batch=8, seq=16, seed=3)
  for _ in range(5):
    x, y = next(it)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == np.int32
    # With ids = arange, a contiguous window is a run of +1 steps and
    # the target is the input shifted one to the right.
    assert (np.diff(x, axis=1) == 1).all()
    assert (y == x + 1).all()
    assert x.min() >= 0 and y.max() <= 999


def test_char_batches_depend_only_on_seed():
  ids = np.arange(500, dtype=np.int32)
  a = [next(D.char_batches(ids, 4, 8, seed=1))[0] for _ in range(2)]
  b = next(D.char_batches(ids, 4, 8, seed=2))[0]
  np.testing.assert_array_equal(a[0], a[1])
  assert not np.array_equal(a[0], b)


def test_char_batches_rejects_short_input():
  with pytest.raises(ValueError):
    next(D.char_batches(np.arange(8), 2, 8, seed=0))


def test_eval_windows_fixed_and_spanning():
  ids = np.arange(1000, dtype=np.int32)
  w1 = D.eval_windows(ids, batch=4, seq=10, n_batches=3)
  w2 = D.eval_windows(ids, batch=4, seq=10, n_batches=3)
  assert len(w1) == 3
  for (x1, y1), (x2, y2) in zip(w1, w2):
    assert x1.shape == y1.shape == (4, 10) and x1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert (y1 == x1 + 1).all() and (np.diff(x1, axis=1) == 1).all()
  # Evenly spread from the very start to the very end of the ids.
  assert w1[0][0][0, 0] == 0
  assert w1[-1][1][-1, -1] == 999
  starts = np.concatenate([x[:, 0] for x, _ in w1])
  assert (np.diff(starts) > 0).all()


# --- digits ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_data():
  return D.digits()


def test_digits_shapes_and_range(digit_data):
  from sklearn.datasets import load_digits

  images, labels = digit_data
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert labels.shape == (1797,) and labels.dtype == np.int32
  assert images.min() == -1.0 and images.max() == 1.0
  assert set(labels.tolist()) == set(range(10))
  raw = load_digits()
  np.testing.assert_allclose((images[..., 0] + 1) * 8, raw.images, atol=1e-5)
  np.testing.assert_array_equal(labels, raw.target)


def test_split_digits_is_deterministic_disjoint_and_stratified(digit_data):
  images, labels = digit_data
  tr, ho = D.digits_split_indices(labels, 0.2, seed=0)
  tr2, ho2 = D.digits_split_indices(labels, 0.2, seed=0)
  np.testing.assert_array_equal(ho, ho2)
  assert not set(tr) & set(ho)
  assert len(tr) + len(ho) == len(labels)
  assert abs(len(ho) / len(labels) - 0.2) < 0.01
  for c in range(10):
    n_c = np.sum(labels == c)
    assert abs(np.sum(labels[ho] == c) - 0.2 * n_c) <= 0.5
  _, ho_other = D.digits_split_indices(labels, 0.2, seed=1)
  assert not np.array_equal(ho, ho_other)

  (xtr, ytr), (xho, yho) = D.split_digits(images, labels)
  np.testing.assert_array_equal(xho, images[ho])
  np.testing.assert_array_equal(ytr, labels[tr])
  assert xtr.shape == (len(tr), 8, 8, 1)
