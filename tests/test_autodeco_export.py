"""AutoDeco's checkpoint format: save, reload bit for bit, merge and split, the original's layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from testtime.autodeco import AutoDecoConfig, AutoDecoModel, TempHead, TopPHead
from testtime.autodeco_export import load_autodeco, merge_autodeco, save_autodeco, split_autodeco


def _trained_like(model):
    """Non-default head weights so a wrong load cannot pass by accident."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_export_reload_bit_identical(tiny_model_dir, tmp_path):
    from testtime.loading import load_model_and_tokenizer

    llm, tok = load_model_and_tokenizer(tiny_model_dir)
    model = _trained_like(AutoDecoModel(llm, base_model_name_or_path=tiny_model_dir))
    model.save_pretrained(tmp_path / "heads")
    cfg = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert cfg["model_type"] == "autodeco" and cfg["base_model_type"] == "llama" and cfg["hidden_size"] == 32
    assert cfg["base_model_name_or_path"] == tiny_model_dir
    assert cfg["enable_temperature_head"] and cfg["enable_top_p_head"] and cfg["use_enhanced_features"]
    keys = set(load_file(tmp_path / "heads" / "model.safetensors"))
    assert keys == {f"{h}.mlp.{i}.{w}" for h in ("temp_head", "top_p_head") for i in (0, 2)
                    for w in ("weight", "bias")}
    ids = torch.randint(5, 100, (2, 10))
    ref = model(ids)
    again = load_autodeco(tmp_path / "heads")  # base from base_model_name_or_path
    out = again(ids)
    assert torch.equal(ref.temperature, out.temperature) and torch.equal(ref.top_p, out.top_p)
    # merge -> split -> reload, and the merged folder on its own
    merge_autodeco(tmp_path / "heads", tmp_path / "merged")
    merged_keys = set(load_file(tmp_path / "merged" / "model.safetensors"))
    assert keys < merged_keys and all(k.startswith(("llm.", "temp_head.", "top_p_head.")) for k in merged_keys)
    assert "llm.lm_head.weight" in merged_keys and (tmp_path / "merged" / "tokenizer.json").exists()
    split_autodeco(tmp_path / "merged", tmp_path / "split")
    assert set(load_file(tmp_path / "split" / "model.safetensors")) == keys
    for folder in ("split", "merged"):
        out = load_autodeco(tmp_path / folder)(ids)
        assert torch.equal(ref.temperature, out.temperature) and torch.equal(ref.top_p, out.top_p)
    merged, merged_tok = load_autodeco(tmp_path / "merged", return_tokenizer=True)
    assert merged_tok.encode("abc") == tok.encode("abc")
    assert all(torch.equal(a, b) for a, b in zip(merged.llm.state_dict().values(), llm.state_dict().values()))
    # a sharded merge reads back the same
    merge_autodeco(tmp_path / "heads", tmp_path / "sharded", model=llm, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    out = load_autodeco(tmp_path / "sharded")(ids)
    assert torch.equal(ref.temperature, out.temperature)


def test_reload_onto_given_model_and_single_head(tiny_llama, tmp_path):
    llm, _ = tiny_llama
    model = _trained_like(AutoDecoModel(llm, enable_top_p_head=False, use_enhanced_features=False))
    save_autodeco(tmp_path, model.temp_head, None, model.config)
    cfg = AutoDecoConfig.load(tmp_path)
    assert cfg.enable_temperature_head and not cfg.enable_top_p_head
    again = load_autodeco(tmp_path, model=llm)
    ids = torch.randint(5, 100, (1, 7))
    assert again.top_p_head is None and torch.equal(model(ids).temperature, again(ids).temperature)


def test_hidden_size_mismatch_names_both_sizes(tiny_llama, tmp_path):
    llm, _ = tiny_llama
    cfg = AutoDecoConfig(base_model_type="llama", hidden_size=48)
    save_autodeco(tmp_path, TempHead(48), TopPHead(48), cfg)
    with pytest.raises(ValueError, match=r"48.*32") as err:
        load_autodeco(tmp_path, model=llm)
    assert "model.safetensors" in str(err.value)


def test_loads_a_config_written_like_the_original(tiny_llama, tmp_path):
    """The original writes the base config plus its own fields, and both heads even when one is off."""
    from safetensors.torch import save_file

    llm, _ = tiny_llama
    torch.manual_seed(3)
    temp, top_p = TempHead(32), TopPHead(32)
    tensors = {f"temp_head.{k}": v for k, v in temp.state_dict().items()}
    tensors.update({f"top_p_head.{k}": v for k, v in top_p.state_dict().items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = {**llm.config.to_dict(), "model_type": "autodeco", "base_model_type": "llama",
           "base_model_name_or_path": "/nowhere", "enable_temperature_head": True, "enable_top_p_head": False,
           "use_enhanced_features": True, "temperature_hidden_size": 32, "top_p_hidden_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_autodeco(tmp_path, model=llm)
    assert model.top_p_head is None
    ids = torch.randint(5, 100, (1, 6))
    out = model(ids)
    assert torch.equal(out.temperature, temp(out.hidden_states))


@pytest.mark.parametrize("saved_enhanced", [False, True])
def test_enhanced_features_that_disagree_with_the_config_are_named(tiny_llama, tmp_path, saved_enhanced):
    llm, _ = tiny_llama
    model = AutoDecoModel(llm, use_enhanced_features=saved_enhanced)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["use_enhanced_features"] = not saved_enhanced  # a config that says the opposite
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_enhanced_features") as err:
        load_autodeco(tmp_path, model=llm)
    assert f"set it to {'true' if saved_enhanced else 'false'}" in str(err.value)
    assert "hidden size 32 +" in str(err.value)


def test_the_exported_config_carries_no_conversion_leftovers(tiny_llama, tmp_path):
    llm, _ = tiny_llama
    llm.config._model_name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what a GGUF conversion left
    AutoDecoModel(llm).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert not [k for k in config if k.startswith("_")]
    assert "id2label" not in config and "label2id" not in config  # the defaults are not written
    assert config["hidden_size"] == 32 and config["model_type"] == "autodeco" and config["base_model_type"] == "llama"
