"""Corpus building: splits by file, the tokenizer, token files, and the messages for bad corpora."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from parloop import cli
from parloop.train import corpus as corpus_module
from parloop.train.corpus import Corpus, TokenWindows, build_corpus, iter_documents
from parloop.train.errors import DataError

VOCAB = 300


def write_source_tree(root: Path, count: int = 40, first: int = 0) -> dict[str, str]:
    """`count` small Python files; each carries a marker `file-NNN` that occurs in no other file."""
    files = {}
    for i in range(first, first + count):
        body = "".join(f"def f_{i}_{j}(x, y={j}):\n    '''Return x plus {j} (file-{i:03d}).'''\n"
                       f"    return x + y * {i}\t# ünïcode ✓\r\n" for j in range(6))
        files[f"pkg{i % 4}/mod_{i:03d}.py"] = f"# file-{i:03d}\n{body}"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8", newline="")
    return files


def build_tiny_corpus(tmp: Path) -> Path:
    """A corpus of 40 generated files, for the training tests."""
    write_source_tree(tmp / "src")
    build_corpus(str(tmp / "src"), tmp / "corpus", vocab_size=VOCAB, val_fraction=0.2, test_fraction=0.2)
    return tmp / "corpus"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("src")
    files = write_source_tree(root)
    (root / "empty.py").write_text("")
    (root / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    return root, files


@pytest.fixture(scope="module")
def corpus(tree: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    out = tmp_path_factory.mktemp("corpus") / "c"
    assert cli.main(["data", "build", "--source", str(tree[0]), "--out", str(out), "--vocab-size", str(VOCAB),
                     "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    return Corpus(out)


def _split_texts(corpus: Corpus) -> dict[str, list[str]]:
    tok = corpus.tokenizer()
    eos = tok.eos_token_id
    out = {}
    for split in ("train", "val", "test"):
        ids = np.asarray(corpus.tokens(split)).tolist()
        assert ids[-1] == eos
        docs, start = [], 0
        for i, t in enumerate(ids):
            if t == eos:
                docs.append(tok.decode(ids[start:i]))
                start = i + 1
        out[split] = docs
    return out


def test_every_file_lands_whole_in_exactly_one_split(corpus: Corpus, tree: tuple[Path, dict[str, str]]) -> None:
    files = tree[1]
    splits = _split_texts(corpus)
    where = {}
    for split, docs in splits.items():
        for doc in docs:
            matches = [name for name, text in files.items() if text == doc]
            assert len(matches) == 1, f"a {split} document is not exactly one source file"
            assert matches[0] not in where, f"{matches[0]} is in {where.get(matches[0])} and {split}"
            where[matches[0]] = split
    assert set(where) == set(files)  # the empty and the latin-1 file are skipped, every other file is there
    assert all(len(splits[s]) > 0 for s in splits)
    assert corpus.meta["skipped"] == {"not_utf8": 1, "empty": 1}
    listed = (corpus.path / "test_files.txt").read_text().split()
    assert sorted(listed) == sorted(n for n, s in where.items() if s == "test")
    for split, docs in splits.items():
        assert corpus.meta["splits"][split]["documents"] == len(docs)
        assert corpus.meta["splits"][split]["bytes"] == sum(len(d.encode()) for d in docs)
        assert corpus.meta["splits"][split]["tokens"] == len(corpus.tokens(split))


def test_split_is_a_function_of_the_path_alone(corpus: Corpus, tree: tuple[Path, dict[str, str]],
                                               tmp_path: Path) -> None:
    """Rebuilding (in another directory, with more files added) keeps every old file in its split."""
    root = tmp_path / "src"
    shutil.copytree(tree[0], root)
    write_source_tree(root, count=20, first=100)
    out = tmp_path / "c"
    build_corpus(str(root), out, vocab_size=VOCAB, val_fraction=0.2, test_fraction=0.2)
    before = set((corpus.path / "test_files.txt").read_text().split())
    after = set((out / "test_files.txt").read_text().split())
    assert before == {n for n in after if int(n.split("_")[1][:3]) < 100}
    assert after - before, "20 new files should add some test files"
    again = tmp_path / "again"
    build_corpus(str(root), again, vocab_size=VOCAB, val_fraction=0.2, test_fraction=0.2)
    for name in ("train.bin", "val.bin", "test.bin", "test_files.txt"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_tokenizer_round_trips_text_exactly(corpus: Corpus) -> None:
    tok = AutoTokenizer.from_pretrained(corpus.path / "tokenizer")
    assert tok.eos_token_id is not None and tok.bos_token_id is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    for text in ["def f(x):\n\treturn x  \r\n", "  leading and trailing  ", "日本語 · émoji 🐍 \u200b", "",
                 "x = '<|endoftext|>' if y else \"\\n\"", "\n\n\n    \t\t"]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert corpus.vocab_size == len(tok) == VOCAB


def test_token_bytes_add_up_to_the_text_bytes(corpus: Corpus) -> None:
    """Bits per byte divide by these counts: per split they must equal the UTF-8 bytes of its documents."""
    per_token = corpus.token_bytes()
    for split in ("train", "val", "test"):
        assert per_token[np.asarray(corpus.tokens(split))].sum() == corpus.meta["splits"][split]["bytes"]


def test_existing_corpus_is_reused_and_other_settings_refused(corpus: Corpus, tree: tuple[Path, dict[str, str]]
                                                              ) -> None:
    meta = build_corpus(str(tree[0]), corpus.path, vocab_size=VOCAB, val_fraction=0.2, test_fraction=0.2)
    assert meta == corpus.meta
    with pytest.raises(DataError, match="other settings.*--force"):
        build_corpus(str(tree[0]), corpus.path, vocab_size=VOCAB + 1, val_fraction=0.2, test_fraction=0.2)


def test_jsonl_and_glob_sources(tmp_path: Path) -> None:
    files = write_source_tree(tmp_path / "src", count=12)
    lines = [json.dumps({"content": text}) for text in files.values()]
    (tmp_path / "code.jsonl").write_text("\n".join(lines) + "\n")
    docs = list(iter_documents(str(tmp_path / "code.jsonl"), text_field="content"))
    assert [d.text for d in docs] == list(files.values())
    globbed = list(iter_documents(str(tmp_path / "src" / "pkg1" / "*.py")))
    assert [d.name for d in globbed] == sorted(n.split("/")[1] for n in files if n.startswith("pkg1/"))
    with pytest.raises(DataError, match="no field 'text'.*--text-field"):
        list(iter_documents(str(tmp_path / "code.jsonl")))


def test_stdlib_source_is_the_standard_library_without_site_packages() -> None:
    names = [d.name for d in iter_documents("stdlib")]
    assert "json/decoder.py" in names and "os.py" in names
    assert not any("site-packages" in n for n in names)
    assert names == sorted(names)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no source files found .* matching '\\*.py'"),
    (lambda p: (p.mkdir(), (p / "a.py").write_text(""), (p / "b.py").write_bytes(b"\xff\xfe")), "is empty"),
    (lambda p: (p.mkdir(), (p / "a.py").write_text("x = 1\n")), "split .* is empty"),
])
def test_missing_or_empty_corpus_is_refused_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           setup, message: str) -> None:
    source = tmp_path / "src"
    setup(source)
    code = cli.main(["data", "build", "--source", str(source), "--out", str(tmp_path / "out")])
    assert code == 2
    assert not list(tmp_path.glob("out*"))  # failed before writing anything
    err = capsys.readouterr().err
    assert "parloop data build: error:" in err
    assert re.search(message, err), err


def test_building_into_a_directory_that_is_not_a_corpus_is_refused(tree: tuple[Path, dict[str, str]],
                                                                   tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a corpus directory"):
        build_corpus(str(tree[0]), tmp_path, vocab_size=VOCAB, force=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_reading_a_directory_that_is_not_a_corpus_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no corpus at .*parloop data build --out"):
        Corpus(tmp_path)


def test_training_order_is_a_pure_function_of_seed_and_sample() -> None:
    windows = TokenWindows(np.arange(1001, dtype=np.uint16), seq_len=10)
    assert windows.count == 100
    first_epoch = windows.shuffled(seed=3, first_sample=0, count=100)
    assert sorted(first_epoch.tolist()) == list(range(100))  # each window once per epoch
    # any slice of the stream, asked for separately (as after a resume), is the same slice
    assert np.array_equal(windows.shuffled(3, 37, 90), np.r_[first_epoch[37:], windows.shuffled(3, 100, 27)])
    assert not np.array_equal(first_epoch, windows.shuffled(4, 0, 100))
    batch = windows.get(np.array([0, 5]))
    assert batch.shape == (2, 11) and batch[1, 0] == 50 and batch[1, -1] == 60


def test_site_packages_source_dedups_by_content_and_splits_by_path(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # two environments: the same modules (one copy identical, one a different version) plus exact copies under
    # other names, which must be read once
    env_a, env_b = tmp_path / "a" / "site-packages", tmp_path / "b" / "site-packages"
    files = write_source_tree(env_a, count=60)
    write_source_tree(env_b, count=10)  # byte-identical to env_a's first ten files
    (env_b / "pkg0" / "mod_020.py").write_text(files["pkg0/mod_020.py"] + "# version 2\n")  # same path, new text
    for i in range(5):  # the same content under a new name
        (env_a / "vendored" / f"copy_{i}.py").parent.mkdir(exist_ok=True)
        (env_a / "vendored" / f"copy_{i}.py").write_text(files[f"pkg{(30 + i) % 4}/mod_{30 + i:03d}.py"])
    (env_a / "data.txt").write_text("not python")
    monkeypatch.setattr(corpus_module, "site_packages_roots", lambda: [env_a, env_b])

    skipped: dict[str, int] = {}
    docs = list(iter_documents("site-packages", skipped=skipped))
    assert skipped["duplicate"] == 10 + 5
    assert len(docs) == 60 + 1 and len({d.text for d in docs}) == len(docs)
    split = {d.text: corpus_module.split_of(d.key, 0.2, 0.2) for d in docs}
    by_name: dict[str, set[str]] = {}
    for d in docs:
        by_name.setdefault(d.name, set()).add(split[d.text])
    # a path is in one split only, whichever environment its versions came from
    assert all(len(s) == 1 for s in by_name.values()) and len(by_name["pkg0/mod_020.py"]) == 1

    meta = build_corpus("site-packages", tmp_path / "corpus", vocab_size=VOCAB, val_fraction=0.2, test_fraction=0.2)
    assert meta["skipped"]["duplicate"] == 15
    assert sum(s["documents"] for s in meta["splits"].values()) == 61
    assert str(env_a) in meta["settings"]["source"] and str(env_b) in meta["settings"]["source"]
    held_out = {n for n in (tmp_path / "corpus" / "test_files.txt").read_text().split()}
    assert held_out == {d.name for d in docs if split[d.text] == "test"}
    texts = {s: {d.text for d in docs if split[d.text] == s} for s in ("train", "val", "test")}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])
    assert all(texts.values())
