"""LMTextDataModule: exact blocks, file-level splits, the stdlib source, caching, bad input."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

import datamodules.lm_text as lm_text
from datamodules.lm_text import LMTextDataModule, split_of


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder."""
    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """30 small files of three kinds, plus files that must be ignored."""
    root = tmp_path / "corpus"
    for i in range(30):
        sub = root / f"dir{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        suffix = (".txt", ".md", ".py")[i % 3]
        (sub / f"file{i}{suffix}").write_text(f"Document {i} says hello\n" * (i % 4 + 1), encoding="utf-8")
    (root / "data.bin").write_bytes(b"\x00\x01")  # matches no pattern
    (root / ".git").mkdir()
    (root / ".git" / "notes.txt").write_text("hidden", encoding="utf-8")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.py").write_text("compiled", encoding="utf-8")
    return root


def make(tiny_model_dir, source, **kwargs) -> LMTextDataModule:
    dm = LMTextDataModule(tiny_model_dir, source=str(source), **kwargs)
    dm.setup("fit")
    return dm


def all_ids(dm, split) -> list[int]:
    return [t for i in range(len(dm.datasets[split])) for t in dm.datasets[split][i]["input_ids"].tolist()]


def stream(tokenizer, root: Path, keys: list[str]) -> list[int]:
    """What a split should hold: each file's tokens then EOS, in key order."""
    ids = []
    for key in keys:
        ids += tokenizer((root / key).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    return ids


def test_blocks_are_exact_and_decode_to_the_files(corpus, tiny_model_dir, tokenizer):
    make(tiny_model_dir, corpus, block_size=16, val_fraction=0.0, test_fraction=0.0)
    dm = make(tiny_model_dir, corpus, block_size=16, val_fraction=0.0, test_fraction=0.0)  # from the cache
    assert dm.stats["train"]["cached"] and dm.stats["val"]["tokens"] == 0
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []  # Lightning skips empty stages
    keys = dm.split_documents["train"]
    assert len(keys) == 30 and keys == sorted(keys)  # ignored files really are ignored
    expected = stream(tokenizer, corpus, keys)
    n_blocks = len(expected) // 16
    assert dm.stats["train"]["blocks"] == n_blocks and dm.stats["train"]["dropped_tokens"] == len(expected) % 16
    assert all_ids(dm, "train") == expected[: n_blocks * 16]
    first = dm.datasets["train"][0]
    assert first["input_ids"].shape == (16,) and first["attention_mask"].all()
    assert (first["labels"] == first["input_ids"]).all()
    assert tokenizer.decode(first["input_ids"]) == (corpus / keys[0]).read_text()[:16]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (8, 16)


def test_splits_are_per_file_deterministic_and_disjoint(corpus, tiny_model_dir, tokenizer):
    dm = make(tiny_model_dir, corpus, block_size=1, val_fraction=0.2, test_fraction=0.2)
    splits = dm.split_documents
    assert all(splits.values())
    assert set(splits["train"]).isdisjoint(splits["val"]) and set(splits["val"]).isdisjoint(splits["test"])
    assert sorted(sum(splits.values(), [])) == sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("file*"))
    for split, keys in splits.items():
        assert all(split_of(k, 0.2, 0.2) == split for k in keys)
        assert all_ids(dm, split) == stream(tokenizer, corpus, keys)  # block_size=1 drops nothing

    # Adding files changes no existing file's split; neither does max_files.
    for i in range(30, 40):
        (corpus / f"new{i}.txt").write_text(f"new file {i}", encoding="utf-8")
    grown = make(tiny_model_dir, corpus, block_size=1, val_fraction=0.2, test_fraction=0.2).split_documents
    capped = make(tiny_model_dir, corpus, block_size=1, val_fraction=0.2, test_fraction=0.2, max_files=8)
    for split in splits:
        assert set(splits[split]) <= set(grown[split])
        assert set(capped.split_documents[split]) <= set(grown[split])


def test_max_files_is_a_deterministic_cap_that_feeds_every_split(corpus, tiny_model_dir):
    def chosen(**kw):
        return make(tiny_model_dir, corpus, block_size=4, val_fraction=0.2, test_fraction=0.2, max_files=6,
                    **kw).split_documents

    first = chosen()
    assert sum(len(k) for k in first.values()) == 6 and all(first.values())
    assert all(keys == sorted(keys) for keys in first.values())  # concatenated in path order
    assert chosen(cache=False) == first


def test_stdlib_source_with_a_few_files(tiny_model_dir, tokenizer):
    dm = make(tiny_model_dir, "stdlib", block_size=32, max_files=5, val_fraction=0.2, test_fraction=0.2)
    keys = sum(dm.split_documents.values(), [])
    assert len(keys) == 5 and all(k.endswith(".py") for k in keys)
    assert not any("site-packages" in k or "__pycache__" in k for k in keys)
    assert dm.stats["train"]["blocks"] > 0
    first_file = Path(sysconfig.get_paths()["stdlib"]) / dm.split_documents["train"][0]
    text = first_file.read_text(encoding="utf-8")
    assert tokenizer.decode(dm.datasets["train"][0]["input_ids"]) == text[:32]


def test_cache_skips_tokenization_until_a_file_changes(corpus, tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    real = lm_text.encode_documents
    monkeypatch.setattr(lm_text, "encode_documents", lambda tok, texts: calls.append(len(texts)) or real(tok, texts))
    settings = dict(block_size=8, val_fraction=0.2, test_fraction=0.2)

    first = make(tiny_model_dir, corpus, **settings)
    assert sum(calls) == 30 and not first.stats["train"]["cached"]
    files = sorted(p.name for p in (tmp_path / "cache" / "lm_text").iterdir())
    assert len(files) == 3 and all(f.endswith((".npy")) and not f.startswith(".") for f in files)  # no temp left

    calls.clear()
    second = make(tiny_model_dir, corpus, **settings)
    assert calls == [] and second.stats["train"]["cached"]
    for split in ("train", "val", "test"):
        assert all_ids(second, split) == all_ids(first, split)
    # The block size is applied after the cache: changing it needs no tokenization either.
    assert make(tiny_model_dir, corpus, **{**settings, "block_size": 5}).stats["train"]["cached"] and calls == []

    edited = corpus / first.split_documents["train"][0]
    edited.write_text(edited.read_text() + "one more line\n", encoding="utf-8")
    third = make(tiny_model_dir, corpus, **settings)
    assert calls and not third.stats["train"]["cached"]
    assert third.stats["train"]["tokens"] == first.stats["train"]["tokens"] + len("one more line\n")


def test_prepare_data_fills_the_cache_for_setup(corpus, tiny_model_dir, monkeypatch):
    dm = LMTextDataModule(tiny_model_dir, source=str(corpus), block_size=8)
    dm.prepare_data()
    monkeypatch.setattr(lm_text, "encode_documents", lambda *a: pytest.fail("setup re-tokenized"))
    dm.setup("fit")
    assert dm.stats["train"]["cached"]


def test_single_file_is_split_along_its_token_stream(tmp_path, tiny_model_dir, tokenizer):
    text = "".join(f"line {i}\n" for i in range(200))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    dm = make(tiny_model_dir, path, block_size=1, val_fraction=0.1, test_fraction=0.05)
    n = len(text) + 1  # char-level tokens plus EOS
    assert [dm.stats[s]["tokens"] for s in ("train", "val", "test")] == [n - int(n * 0.1) - int(n * 0.05),
                                                                         int(n * 0.1), int(n * 0.05)]
    ids = all_ids(dm, "train") + all_ids(dm, "val") + all_ids(dm, "test")
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_saved_dataset_source(tmp_path, tiny_model_dir, tokenizer):
    texts = [f"row {i} of the dataset" for i in range(20)]
    Dataset.from_dict({"body": texts, "id": list(range(20))}).save_to_disk(str(tmp_path / "ds"))
    dm = make(tiny_model_dir, tmp_path / "ds", text_column="body", block_size=1, val_fraction=0.0, test_fraction=0.0)
    decoded = tokenizer.decode(all_ids(dm, "train"))
    assert sorted(decoded.split(tokenizer.eos_token)[:-1]) == sorted(texts)
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        make(tiny_model_dir, tmp_path / "ds")


# -- bad input -------------------------------------------------------------------------------

def test_missing_source_is_named(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        make(tiny_model_dir, tmp_path / "missing.txt")


def test_non_utf8_file_is_named_with_its_byte_offset(corpus, tiny_model_dir):
    (corpus / "dir0" / "latin1.txt").write_bytes("ok: caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8 \(byte offset 7"):
        make(tiny_model_dir, corpus, cache=False, val_fraction=0.0, test_fraction=0.0)


def test_source_without_matching_files_names_source_and_patterns(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"empty: no files match \['\*\.rst'\]"):
        make(tiny_model_dir, tmp_path / "empty", patterns=["*.rst"])


def test_signature_parses_with_jsonargparse(corpus, tiny_model_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LMTextDataModule, "data")
    cfg = parser.parse_args([f"--data.model_name_or_path={tiny_model_dir}", f"--data.source={corpus}",
                             '--data.patterns=["*.md"]', "--data.max_files=3", "--data.block_size=4"])
    assert cfg.data.block_size == 4 and cfg.data.val_fraction == 0.02 and cfg.data.source == str(corpus)
    dm = parser.instantiate_classes(cfg).data
    dm.setup()
    keys = sum(dm.split_documents.values(), [])
    assert len(keys) == 3 and all(k.endswith(".md") for k in keys)
    assert isinstance(dm.datasets["train"].tokens, np.ndarray)
