"""Code corpora for training: `parloop data build` and the `Corpus` a training run reads (docs/training.md).

A corpus directory holds
- `tokenizer/`: a byte-level BPE tokenizer in the `transformers` format (`AutoTokenizer.from_pretrained` loads
  it); `<|endoftext|>` is both BOS and EOS (GPT-2 style: it precedes every document in the token stream, so a
  prompt starting with it looks like the start of a document), `<|pad|>` is the pad token;
- `train.bin`, `val.bin`, `test.bin`: token ids as a flat numpy memmap (uint16 when the vocabulary fits), the
  documents of each split one after another, each followed by the EOS id;
- `meta.json`: the build settings, the dtype and per-split counts of documents, bytes and tokens;
- `test_files.txt`: the documents of the test split, one name a line.

The split of a document is a pure function of its name (a hash of the path relative to the source root), so a
file never straddles two splits and the same file lands in the same split on every machine.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import site
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from parloop.train.errors import DataError, exit_code

SPLITS = ("train", "val", "test")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
META_FILE = "meta.json"
FORMAT = "parloop-corpus-v1"
_ENCODE_BATCH = 64


@dataclass(frozen=True)
class Document:
    name: str  # path relative to the source root (or `file.jsonl:line`); printed in test_files.txt
    key: str  # what the split hash is taken of
    text: str


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a document: a hash of its key mapped to [0, 1), then test | val | train by the fractions."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages_roots() -> list[Path]:
    """The site-packages directories of this interpreter (and the user's), those that exist, without repeats."""
    candidates = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
                  sysconfig.get_paths()["platlib"]]
    roots: list[Path] = []
    for c in candidates:
        path = Path(c).resolve()
        if path.is_dir() and path not in roots:
            roots.append(path)
    return roots


def _site_packages_documents(skipped: dict[str, int]) -> Iterator[Document]:
    """The `.py` files installed in site-packages, each content once (the first by path; later copies are
    counted in `skipped["duplicate"]`). A file's split key is its path inside site-packages, so the versions of one
    module installed in two environments land in the same split; with exact copies removed, no text is in two
    splits."""
    skipped.setdefault("duplicate", 0)
    roots = site_packages_roots()
    paths = sorted(((p.relative_to(root).as_posix(), p) for root in roots for p in root.rglob("*.py")
                    if p.is_file()), key=lambda item: item[0])
    if not paths:
        raise DataError(f"no Python files found in site-packages ({', '.join(map(str, roots)) or 'none found'})")
    seen: set[bytes] = set()
    for name, path in tqdm(paths, desc="reading", unit="file", leave=False):
        text = _read_text(path)
        if text is None:
            skipped["not_utf8"] += 1
            continue
        if not text:
            skipped["empty"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(digest)
        yield Document(name, name, text)


def _glob_base(pattern: str) -> Path:
    """The directory part of a glob before its first wildcard: document names are relative to it."""
    parts = Path(pattern).parts
    first_magic = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def _read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None for a file that is not UTF-8 text (binary, legacy encodings)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _file_documents(root: Path, paths: list[Path], skipped: dict[str, int]) -> Iterator[Document]:
    for path in tqdm(paths, desc="reading", unit="file", leave=False):
        text = _read_text(path)
        if text is None:
            skipped["not_utf8"] += 1
        elif not text:
            skipped["empty"] += 1
        else:
            name = path.relative_to(root).as_posix()
            yield Document(name, name, text)


def _jsonl_documents(path: Path, text_field: str, skipped: dict[str, int]) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{line_no} has no field {text_field!r}; pick the field that holds the "
                                f"text with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: field {text_field!r} is {type(text).__name__}, not a string")
            if not text:
                skipped["empty"] += 1
                continue
            # the text itself is the split key, so exact duplicates can never straddle two splits
            yield Document(f"{path.name}:{line_no}", text, text)


def iter_documents(source: str, pattern: str = "*.py", text_field: str = "text",
                   skipped: dict[str, int] | None = None) -> Iterator[Document]:
    """Documents of `source` in a deterministic order.

    `source` is `stdlib` (the Python standard library's own `.py` files, without site-packages),
    `site-packages` (the `.py` files installed for this interpreter, deduplicated by content), a directory
    (files matching `pattern`, recursively), a glob (`src/**/*.c`) or a `.jsonl` file with a `text_field`.
    Files that are not UTF-8 text and empty documents are skipped and counted in `skipped`.
    """
    skipped = {"not_utf8": 0, "empty": 0} if skipped is None else skipped
    skipped.setdefault("not_utf8", 0)
    skipped.setdefault("empty", 0)
    if source == "site-packages":
        yield from _site_packages_documents(skipped)
        return
    if source == "stdlib":
        root = stdlib_root()
        paths = [p for p in root.rglob("*.py")
                 if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    elif source.endswith(".jsonl"):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"corpus file {source!r} does not exist")
        yield from _jsonl_documents(path, text_field, skipped)
        return
    elif glob.has_magic(source):
        root = _glob_base(source)
        paths = [Path(p) for p in glob.glob(source, recursive=True)]
    elif Path(source).is_dir():
        root = Path(source)
        paths = list(root.rglob(pattern))
    else:
        raise DataError(f"corpus source {source!r} does not exist: give 'stdlib', a directory, a glob such as "
                        f"'src/**/*.py', or a .jsonl file")
    paths = sorted((p for p in paths if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        where = source if source != "stdlib" else f"the standard library ({root})"
        raise DataError(f"no source files found in {where}"
                        + (f" matching {pattern!r}" if Path(source).is_dir() else ""))
    yield from _file_documents(root, paths, skipped)


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE `transformers` tokenizer trained on `texts` (lossless: decode(encode(t)) == t)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # its own bars would print beside ours
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False)


def _encode(tokenizer: Any, texts: list[str], eos_id: int, dtype: np.dtype, desc: str) -> np.ndarray:
    backend = tokenizer.backend_tokenizer
    # A source file that contains the text "<|endoftext|>" must stay text, not become a document boundary.
    backend.encode_special_tokens = True
    chunks = []
    for i in tqdm(range(0, len(texts), _ENCODE_BATCH), desc=f"tokenizing {desc}", unit="batch", leave=False):
        for enc in backend.encode_batch(texts[i:i + _ENCODE_BATCH], add_special_tokens=False):
            chunks.append(np.asarray(enc.ids + [eos_id], dtype=dtype))
    backend.encode_special_tokens = False
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def _check_settings(vocab_size: int, val_fraction: float, test_fraction: float) -> None:
    if not 256 + 2 <= vocab_size <= 2**32:
        raise DataError(f"vocab_size = {vocab_size} is invalid: a byte-level BPE needs at least 258 tokens "
                        f"(256 bytes and 2 special tokens)")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise DataError(f"{name} = {value} is invalid: must be between 0 and 1")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data")


def _existing_corpus(out: Path, settings: dict[str, Any], force: bool) -> dict[str, Any] | None:
    """The metadata of a corpus in `out` built with `settings` (None: build one); refuses to overwrite others."""
    if out.exists() and not (out / META_FILE).exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a corpus directory; choose an empty or new --out")
    if not (out / META_FILE).exists() or force:
        return None
    meta = json.loads((out / META_FILE).read_text())
    if meta.get("settings") == settings:
        print(f"reusing the corpus in {out} (built with the same settings)", file=sys.stderr)
        return meta
    raise DataError(f"{out} already holds a corpus built with other settings ({meta.get('settings')}); "
                    f"pass --force to rebuild it or choose another --out")


def _split_documents(source: str, pattern: str, text_field: str, val_fraction: float, test_fraction: float,
                     skipped: dict[str, int]) -> dict[str, list[Document]]:
    """The documents of `source` by split; every split must have at least one."""
    docs: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in iter_documents(source, pattern, text_field, skipped):
        docs[split_of(doc.key, val_fraction, test_fraction)].append(doc)
    total = sum(len(d) for d in docs.values())
    if total == 0:
        raise DataError(f"corpus {source!r} is empty: every document was empty or not UTF-8 text ({skipped})")
    for split in SPLITS:
        if not docs[split]:
            raise DataError(f"the {split} split of {source!r} is empty ({total} documents in all): use a larger "
                            f"corpus or raise --val-fraction / --test-fraction")
    return docs


def _write_corpus(out: Path, docs: dict[str, list[Document]], vocab_size: int, settings: dict[str, Any],
                  skipped: dict[str, int]) -> dict[str, Any]:
    """Tokenizer, token files, test file list and metadata into `out`, replacing it at once; returns the metadata."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"training a {vocab_size}-token byte-level BPE on {len(docs['train'])} training documents",
          file=sys.stderr)
    tokenizer = train_tokenizer([d.text for d in docs["train"]], vocab_size)
    tokenizer.save_pretrained(tmp / "tokenizer")
    eos_id = tokenizer.eos_token_id
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    meta: dict[str, Any] = {
        "format": FORMAT, "settings": settings, "vocab_size": len(tokenizer), "dtype": dtype.name,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id,
        "skipped": skipped, "splits": {},
    }
    for split in SPLITS:
        texts = [d.text for d in docs[split]]
        ids = _encode(tokenizer, texts, eos_id, dtype, split)
        ids.tofile(tmp / f"{split}.bin")
        meta["splits"][split] = {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
                                 "tokens": int(ids.size)}
    (tmp / "test_files.txt").write_text("".join(d.name + "\n" for d in docs["test"]))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return meta


def build_corpus(source: str, out_dir: str | Path, vocab_size: int = 8192, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, pattern: str = "*.py", text_field: str = "text",
                 force: bool = False) -> dict[str, Any]:
    """Build (or reuse) a tokenized corpus in `out_dir`; returns its metadata (the content of meta.json).

    An existing corpus built with the same settings is reused; one built with other settings is an error unless
    `force` is set, in which case it is rebuilt.
    """
    _check_settings(vocab_size, val_fraction, test_fraction)
    out = Path(out_dir)
    source_id = {"stdlib": str(stdlib_root()), "site-packages": ":".join(map(str, site_packages_roots()))}.get(
        source, os.path.abspath(source))
    settings = {"source": source_id, "pattern": pattern, "text_field": text_field, "vocab_size": vocab_size,
                "val_fraction": val_fraction, "test_fraction": test_fraction}
    existing = _existing_corpus(out, settings, force)
    if existing is not None:
        return existing
    skipped: dict[str, int] = {}
    docs = _split_documents(source, pattern, text_field, val_fraction, test_fraction, skipped)
    return _write_corpus(out, docs, vocab_size, settings, skipped)


class Corpus:
    """A built corpus directory: token memmaps per split, the tokenizer and per-token byte counts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise DataError(f"no corpus at {str(self.path)!r} ({META_FILE} is missing); build one with "
                            f"`parloop data build --out {self.path}` (the default source is the Python standard "
                            f"library)")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path} is not a {FORMAT} corpus; rebuild it with `parloop data build`")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of `split`, memory-mapped (read-only)."""
        if self.meta["splits"][split]["tokens"] == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def tokenizer(self) -> Any:
        return AutoTokenizer.from_pretrained(self.path / "tokenizer")

    def token_bytes(self) -> np.ndarray:
        """How many UTF-8 bytes of text each token id stands for (0 for special tokens), for bits per byte.

        In a byte-level BPE every character of a token's string stands for exactly one byte.
        """
        tok = self.tokenizer()
        special = set(tok.all_special_ids)
        pieces = tok.convert_ids_to_tokens(list(range(self.vocab_size)))
        return np.array([0 if i in special else len(p) for i, p in enumerate(pieces)], dtype=np.int64)


class TokenWindows:
    """A split's token stream cut into training windows of `seq_len + 1` tokens (inputs and shifted targets).

    Window i covers tokens `[i*seq_len, (i+1)*seq_len]`: consecutive windows share one token, so every token is a
    target exactly once per epoch. The training order is a pure function of (seed, sample number): sample k is
    window `perm(seed, k // n)[k % n]`, a fresh permutation per epoch. A resumed run therefore needs only the
    step number to continue with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        self.count = max(0, (len(tokens) - 1) // seq_len)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Windows `[len(indices), seq_len + 1]` as int64."""
        starts = np.asarray(indices, dtype=np.int64)[:, None] * self.seq_len
        return np.asarray(self.tokens[starts + np.arange(self.seq_len + 1)], dtype=np.int64)

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        if (seed, epoch) not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[seed, epoch] = np.random.default_rng([seed, epoch]).permutation(self.count)
        return self._perms[seed, epoch]

    def shuffled(self, seed: int, first_sample: int, count: int) -> np.ndarray:
        """Window indices of samples `first_sample .. first_sample + count - 1` of the shuffled stream."""
        samples = np.arange(first_sample, first_sample + count)
        return np.array([self._perm(seed, int(k) // self.count)[int(k) % self.count] for k in samples],
                        dtype=np.int64)

    def spread(self, count: int) -> np.ndarray:
        """`count` window indices evenly spread over the split (a fixed evaluation set)."""
        count = min(count, self.count)
        return np.unique(np.linspace(0, self.count - 1, count).round().astype(np.int64))


def summary_table(meta: dict[str, Any]) -> str:
    rows = [f"{'split':<6} {'documents':>10} {'bytes':>12} {'tokens':>11} {'bytes/token':>12}"]
    for split in SPLITS:
        s = meta["splits"][split]
        rows.append(f"{split:<6} {s['documents']:>10,} {s['bytes']:>12,} {s['tokens']:>11,} "
                    f"{s['bytes'] / max(s['tokens'], 1):>12.2f}")
    skipped = meta.get("skipped", {})
    if any(skipped.values()):
        rows.append(f"skipped: {skipped.get('not_utf8', 0)} not UTF-8 text, {skipped.get('empty', 0)} empty"
                    + (f", {skipped['duplicate']} duplicates" if skipped.get("duplicate") else ""))
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="tokenize a code corpus for `parloop train`",
                           description="Split a corpus by file (hash of the path), train a byte-level BPE tokenizer "
                           "on the training split and write token ids to memory-mapped .bin files.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--source", default="stdlib",
                       help="'stdlib' (the Python standard library's sources), 'site-packages' (the Python "
                       "files installed for this interpreter, each content once), a directory, a glob such as "
                       "'src/**/*.py', or a .jsonl file")
    build.add_argument("--out", default="runs/data/stdlib", help="output corpus directory")
    build.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, special tokens included")
    build.add_argument("--val-fraction", type=float, default=0.05, help="share of files in the validation split")
    build.add_argument("--test-fraction", type=float, default=0.05, help="share of files in the test split")
    build.add_argument("--pattern", default="*.py", help="file name pattern when --source is a directory")
    build.add_argument("--text-field", default="text", help="field holding the text when --source is .jsonl")
    build.add_argument("--force", action="store_true", help="rebuild even if --out already holds a corpus")


def run(args: argparse.Namespace) -> int:
    try:
        meta = build_corpus(args.source, args.out, args.vocab_size, args.val_fraction, args.test_fraction,
                            args.pattern, args.text_field, args.force)
    except DataError as e:
        return exit_code(e, "parloop data build")
    print(f"corpus: {args.out}  (vocab {meta['vocab_size']}, source {meta['settings']['source']})")
    print(summary_table(meta))
    return 0
