"""Offline datasets for the experiments.

Everything here is built from files already on the machine (the Python
standard library's sources and scikit-learn's bundled digits), so
experiments never need the network.

* ``stdlib_corpus`` -- a code/prose text corpus from the stdlib's ``.py`` files.
* ``CharVocab`` -- a character vocabulary (fixed ASCII by default).
* ``char_batches`` / ``eval_windows`` -- next-character training windows.
* ``digits`` / ``split_digits`` -- 8x8 handwritten digits in [-1, 1].
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import sysconfig
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

# ---------------------------------------------------------------------------
# stdlib corpus
# ---------------------------------------------------------------------------

# Directory names that are not representative library code: third-party
# packages, test suites (huge, repetitive, and full of deliberately odd
# syntax), the IDLE application, the deprecated 2to3 tool, pydoc's bundled
# topic dump (documentation stored as string *data*, which would leak prose
# into the code split), and the generated codec tables in encodings/ (their
# per-entry comments such as "0x41 -> LATIN CAPITAL LETTER A" would be a
# quarter of all "prose"). config-* (build files) is matched by prefix below.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
     "pydoc_data", "encodings", "__pycache__"}
)
# The generated sysconfig data file embeds the build machine's paths, which
# would make the corpus hash differ between two installs of the same Python.
_SKIP_FILE_PREFIXES = ("_sysconfigdata",)

# ~10% held out: first byte of sha256(relpath) < 26 happens with p = 26/256.
_HELDOUT_BYTE_THRESHOLD = 26

# Comments that carry no prose: shebangs, encoding cookies, and rulers such
# as "# ------" (no letters at all).
_CODING_RE = re.compile(r"^[ \t\f]*#.*?coding[:=]")
_LETTER_RE = re.compile(r"[A-Za-z]")


class Corpus(NamedTuple):
  """The stdlib text corpus, split by file into train and held-out parts.

  ``code_*`` hold source with comments and docstrings removed; ``prose_*``
  hold the removed docstring and comment text. ``sha256`` digests the raw
  bytes of every included file (with its relative path) in sorted order,
  so it identifies the exact source tree the corpus came from.
  """

  code_train: str
  code_heldout: str
  prose_train: str
  prose_heldout: str
  sha256: str
  n_files: int
  train_files: tuple[str, ...]
  heldout_files: tuple[str, ...]


def is_heldout(relpath: str) -> bool:
  """Whether a file (POSIX relative path) belongs to the held-out split.

  Hashing the path rather than drawing at random keeps the split fixed
  across runs, machines and Python patch versions that add or drop files.
  """
  return hashlib.sha256(relpath.encode("utf-8")).digest()[0] < _HELDOUT_BYTE_THRESHOLD


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
  """Sorted ``(relpath, path)`` of candidate stdlib ``.py`` files.

  ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``.
  """
  root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
  out = []
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    parts = rel.parts
    if any(p in _SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
      continue
    if parts[-1].startswith(_SKIP_FILE_PREFIXES):
      continue
    out.append((rel.as_posix(), path))
  # Sorting by the POSIX string (not the Path) keeps the order identical on
  # every OS and filesystem, which the corpus hash depends on.
  out.sort(key=lambda item: item[0])
  return out


def _decode(raw: bytes) -> str:
  """Decode Python source bytes honouring its coding cookie; newlines -> '\\n'."""
  encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
  text = raw.decode(encoding)
  if text.startswith("\ufeff"):
    text = text[1:]
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _docstring_owners(tree: ast.Module) -> Iterator[ast.AST]:
  """Nodes that carry a docstring (module, classes, functions).

  Only statement bodies are searched: definitions cannot hide inside
  expressions, and skipping expression subtrees makes this several times
  cheaper than ``ast.walk`` on the whole stdlib.
  """
  owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
  stack: list[ast.AST] = [tree]
  while stack:
    node = stack.pop()
    body = getattr(node, "body", None)
    if isinstance(node, owners) and body:
      first = body[0]
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
              and isinstance(first.value.value, str)):
        yield node
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
      children = getattr(node, field, None)
      if isinstance(children, list):
        stack.extend(c for c in children if isinstance(c, ast.AST))


def split_source(source: str) -> tuple[str, str]:
  """Split one Python source file into ``(code, prose)``.

  ``code`` is the source with every comment and docstring removed; a
  docstring that was a body's only statement becomes ``pass`` so the code
  still parses, and a line that held only a comment or docstring goes
  away. Nothing else changes (string literals keep every character), so
  ``code`` parses to the same AST as ``source`` minus its docstrings.
  ``prose`` is the cleaned docstrings and comment text in
  file order, one paragraph per docstring or run of adjacent comment
  lines, paragraphs separated by a blank line.

  Raises ``SyntaxError`` / ``tokenize.TokenError`` on invalid source.
  """
  source = source.replace("\r\n", "\n").replace("\r", "\n")
  lines = source.splitlines(keepends=True)
  starts = [0]
  for line in lines:
    starts.append(starts[-1] + len(line))

  def offset(row: int, col: int) -> int:
    return starts[row - 1] + col

  def whole_lines(start: int, end: int) -> tuple[int, int]:
    # A comment or docstring alone on its line(s) takes the line(s) with
    # it, so the blank lines left in the code are the author's own.
    line_start = source.rfind("\n", 0, start) + 1
    line_end = source.find("\n", end)
    line_end = len(source) if line_end < 0 else line_end + 1
    if source[line_start:start].strip() or source[end:line_end].strip():
      return start, end
    return line_start, line_end

  def char_col(row: int, byte_col: int) -> int:
    # ast reports UTF-8 byte columns, tokenize reports character columns.
    return len(lines[row - 1].encode("utf-8")[:byte_col].decode("utf-8"))

  tree = ast.parse(source)

  cuts: list[tuple[int, int, str]] = []  # (start, end, replacement)
  pieces: list[tuple[int, int, str]] = []  # (start row, end row, prose text)

  for owner in _docstring_owners(tree):
    stmt = owner.body[0]
    start = offset(stmt.lineno, char_col(stmt.lineno, stmt.col_offset))
    end = offset(stmt.end_lineno, char_col(stmt.end_lineno, stmt.end_col_offset))
    # "def f(): 'doc'; return 1" -- swallow the ';' or the code breaks.
    rest = source[end:]
    semi = re.match(r"[ \t]*;", rest)
    if semi:
      end += semi.end()
    if len(owner.body) == 1:
      cuts.append((start, end, "pass"))
    else:
      cuts.append((*whole_lines(start, end), ""))
    text = ast.get_docstring(owner, clean=True) or ""
    if text.strip():
      pieces.append((stmt.lineno, stmt.end_lineno, text))

  comment_lines: list[tuple[int, str]] = []
  # Consume tokens lazily: each dies at once, so the ~1M short-lived tuples
  # of a full build never pile up and trigger cyclic-GC passes (which
  # scale with everything else alive in the process, e.g. under pytest).
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type != tokenize.COMMENT:
      continue
    (row, col), (erow, ecol) = tok.start, tok.end
    start, end = whole_lines(offset(row, col), offset(erow, ecol))
    # A trailing comment also takes the spaces before it with it; that
    # whitespace lies outside any string, unlike a blanket rstrip().
    while start > 0 and source[start - 1] in " \t":
      start -= 1
    cuts.append((start, end, ""))
    if row == 1 and tok.string.startswith("#!"):
      continue
    if row <= 2 and _CODING_RE.match(tok.string):
      continue
    text = tok.string.lstrip("#").strip()
    if _LETTER_RE.search(text):
      comment_lines.append((row, text))

  # Adjacent comment lines form one paragraph, like a comment block reads.
  blocks: list[list[tuple[int, str]]] = []
  for row, text in comment_lines:
    if blocks and blocks[-1][-1][0] == row - 1:
      blocks[-1].append((row, text))
    else:
      blocks.append([(row, text)])
  for block in blocks:
    pieces.append((block[0][0], block[-1][0], "\n".join(t for _, t in block)))

  # Stitch the kept spans together in one pass (slicing the string once per
  # cut is quadratic on long files).
  kept: list[str] = []
  pos = 0
  for start, end, repl in sorted(cuts):
    if start < pos:  # overlapping cuts would duplicate text; never seen
      raise ValueError("overlapping comment/docstring spans")
    kept.append(source[pos:start])
    kept.append(repl)
    pos = end
  kept.append(source[pos:])
  code = _tidy_lines("".join(kept))

  pieces.sort(key=lambda p: (p[0], p[1]))
  prose = "\n\n".join(p[2] for p in pieces)
  return code, (prose + "\n" if prose else "")


def _tidy_lines(text: str) -> str:
  """Drop leading blank lines and trailing whitespace; end with one newline.

  Interior lines are left alone: blank lines or trailing spaces inside a
  multi-line string literal are part of its value, so only the edges of the
  file (which lie outside every token) are safe to touch.
  """
  lines = text.split("\n")
  while lines and not lines[0].strip(" \t\f"):
    lines.pop(0)
  text = "\n".join(lines).rstrip()
  return text + "\n" if text else ""


def stdlib_corpus(max_chars: int | None = None, root: str | Path | None = None) -> Corpus:
  """Build the stdlib code/prose corpus (a few seconds; nothing cached).

  Args:
    max_chars: if given, each of the four text splits keeps only its first
      ``max_chars`` characters. The file lists and ``sha256`` always
      describe the full corpus.
    root: stdlib directory; defaults to ``sysconfig.get_paths()["stdlib"]``.

  Files that cannot be decoded, tokenized or parsed are skipped.
  """
  digest = hashlib.sha256()
  code = {False: [], True: []}
  prose = {False: [], True: []}
  names = {False: [], True: []}
  for rel, path in stdlib_files(root):
    raw = path.read_bytes()
    try:
      file_code, file_prose = split_source(_decode(raw))
    except (SyntaxError, tokenize.TokenError, UnicodeDecodeError, ValueError):
      continue
    # Length-prefixing each field makes the digest unambiguous.
    for field in (rel.encode("utf-8"), raw):
      digest.update(len(field).to_bytes(8, "little"))
      digest.update(field)
    held = is_heldout(rel)
    names[held].append(rel)
    if file_code:
      code[held].append(file_code)
    if file_prose:
      prose[held].append(file_prose)

  def join(parts: list[str], sep: str) -> str:
    text = sep.join(parts)
    return text if max_chars is None else text[:max_chars]

  # Code files already end in "\n"; one more gives a blank line between
  # files. Prose gets two so file boundaries look like section breaks.
  return Corpus(
      code_train=join(code[False], "\n"),
      code_heldout=join(code[True], "\n"),
      prose_train=join(prose[False], "\n\n"),
      prose_heldout=join(prose[True], "\n\n"),
      sha256=digest.hexdigest(),
      n_files=len(names[False]) + len(names[True]),
      train_files=tuple(names[False]),
      heldout_files=tuple(names[True]),
  )


# ---------------------------------------------------------------------------
# character vocabulary
# ---------------------------------------------------------------------------

_ASCII_CHARS = "\t\n" + "".join(chr(c) for c in range(32, 127))


@dataclass(frozen=True)
class CharVocab:
  """Character <-> id mapping with one trailing UNK id.

  ``chars[i]`` is the character with id ``i``; id ``len(chars)`` is UNK,
  so ``size == len(chars) + 1``. Use ``CharVocab.ascii()`` for the fixed
  98-symbol vocabulary ('\\t', '\\n', printable ASCII 32..126, UNK) that
  code and prose share; ``CharVocab.from_text`` builds one from data.
  """

  chars: str
  unk_char: str = "\ufffd"

  def __post_init__(self):
    if len(set(self.chars)) != len(self.chars):
      raise ValueError("CharVocab.chars must not repeat a character")
    # A dense code-point -> id table makes encode one numpy gather
    # instead of a Python loop over millions of characters.
    table = np.full(max(map(ord, self.chars), default=0) + 1, self.unk_id, np.int32)
    table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
    object.__setattr__(self, "_table", table)
    object.__setattr__(self, "_lookup", np.array(list(self.chars) + [self.unk_char]))

  @classmethod
  def ascii(cls) -> "CharVocab":
    """The fixed vocabulary: '\\t', '\\n', chr(32)..chr(126), then UNK (size 98)."""
    return cls(_ASCII_CHARS)

  @classmethod
  def from_text(cls, text: str) -> "CharVocab":
    """A vocabulary of the distinct characters of ``text`` in code-point order."""
    return cls("".join(sorted(set(text))))

  @property
  def unk_id(self) -> int:
    return len(self.chars)

  @property
  def size(self) -> int:
    """Number of ids including UNK (the model's vocabulary size)."""
    return len(self.chars) + 1

  def encode(self, text: str) -> np.ndarray:
    """``text`` -> int32 ids of shape ``(len(text),)``; unknown chars -> UNK."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = self._table
    inside = points < len(table)
    ids = table[np.where(inside, points, 0)]
    return np.where(inside, ids, self.unk_id).astype(np.int32)

  def decode(self, ids) -> str:
    """Ids of shape ``(n,)`` -> string; UNK decodes to ``unk_char``."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > self.unk_id):
      raise ValueError(f"ids must lie in [0, {self.unk_id}]")
    return "".join(self._lookup[ids].tolist())


# ---------------------------------------------------------------------------
# next-character windows
# ---------------------------------------------------------------------------


def _check_windows(ids: np.ndarray, seq: int) -> np.ndarray:
  ids = np.asarray(ids, dtype=np.int32).reshape(-1)
  # A window needs seq inputs plus one more target character.
  if len(ids) < seq + 1:
    raise ValueError(f"need at least seq + 1 = {seq + 1} ids, got {len(ids)}")
  return ids


def _gather(ids: np.ndarray, starts: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
  idx = starts[:, None] + np.arange(seq + 1)[None, :]
  window = ids[idx]
  return window[:, :-1], window[:, 1:]


def char_batches(ids: np.ndarray, batch: int, seq: int,
                 seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless random training windows ``(x, y)``, each int32 ``(batch, seq)``.

  Row ``b`` is ``x[b] = ids[s:s + seq]`` and ``y[b] = ids[s + 1:s + seq + 1]``
  for a start ``s``, so ``y`` holds each position's next character. Starts
  are drawn uniformly with ``np.random.default_rng(seed)``, so the stream
  is reproducible from the seed alone.
  """
  ids = _check_windows(ids, seq)
  rng = np.random.default_rng(seed)
  n_starts = len(ids) - seq
  while True:
    starts = rng.integers(0, n_starts, size=batch)
    yield _gather(ids, starts, seq)


def eval_windows(ids: np.ndarray, batch: int, seq: int,
                 n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """A fixed list of ``n_batches`` evaluation batches ``(x, y)``, int32 ``(batch, seq)``.

  Window starts are spread evenly over the whole of ``ids`` (no randomness),
  so every run evaluates on exactly the same characters and the windows
  cover the held-out text end to end rather than one region of it.
  """
  ids = _check_windows(ids, seq)
  n = batch * n_batches
  starts = np.linspace(0, len(ids) - seq - 1, n).round().astype(np.int64)
  x, y = _gather(ids, starts, seq)
  return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(n_batches)]


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


def digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 digits (1797 images, no download).

  Returns ``(images, labels)``: float32 ``(n, 8, 8, 1)`` in [-1, 1]
  (raw pixel counts 0..16 mapped linearly) and int32 ``(n,)`` in 0..9.
  """
  from sklearn.datasets import load_digits  # heavy import; only when asked

  bunch = load_digits()
  images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  return images, bunch.target.astype(np.int32)


def digits_split_indices(labels: np.ndarray, heldout_fraction: float = 0.2,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Sorted ``(train_idx, heldout_idx)`` int64 index arrays, stratified by label.

  Each class contributes ``round(heldout_fraction * count)`` examples to the
  held-out set, so class balance matches between the splits.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    k = int(round(heldout_fraction * len(members)))
    held.append(rng.permutation(members)[:k])
  held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
  train_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
  return train_idx.astype(np.int64), held_idx.astype(np.int64)


def split_digits(images: np.ndarray, labels: np.ndarray, heldout_fraction: float = 0.2,
                 seed: int = 0):
  """Deterministic stratified split: ``((train_x, train_y), (heldout_x, heldout_y))``.

  Shapes follow the inputs: ``images`` ``(n, 8, 8, 1)``, ``labels`` ``(n,)``.
  """
  train_idx, held_idx = digits_split_indices(labels, heldout_fraction, seed)
  return (images[train_idx], labels[train_idx]), (images[held_idx], labels[held_idx])


def stdlib_modules(names, root: str | Path | None = None) -> dict[str, list[tuple[str, str, str]]]:
  """``{name: [(relpath, code, prose), ...]}`` for stdlib top-level packages or modules.

  ``names`` are top-level names (``"email"`` is the package ``email/``, ``"smtplib"``
  the module ``smtplib.py``); files are split by ``split_source`` as in
  ``stdlib_corpus`` and listed in sorted path order. A name with no file maps to an
  empty list; files that do not parse are skipped.
  """
  wanted = set(names)
  out: dict[str, list[tuple[str, str, str]]] = {n: [] for n in names}
  for rel, path in stdlib_files(root):
    top = rel.split("/")[0].removesuffix(".py")
    if top not in wanted:
      continue
    try:
      code, prose = split_source(_decode(path.read_bytes()))
    except (SyntaxError, tokenize.TokenError, UnicodeDecodeError, ValueError):
      continue
    out[top].append((rel, code, prose))
  return out
