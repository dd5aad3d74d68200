"""The quality studies' data plumbing: the head-pruning blocks file that lets another machine
measure the same tokens, and the AutoDeco table that only compares runs with shared baselines."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import yaml


def _ppl_args(blocks, **overrides):
    args = dict(block_size=32, batch_size=2, max_files=4, seed=0, score_blocks=2, eval_blocks=3, gate_steps=1,
                recovery_steps=1, blocks=str(blocks))
    return argparse.Namespace(**{**args, **overrides})


def test_head_gate_blocks_file_gives_the_same_tokens_and_refuses_other_settings(tmp_path, tiny_model_dir):
    from benchmarks.head_gates import load_data

    path = tmp_path / "blocks.pt"
    score, rest, held_out = load_data(_ppl_args(path), tiny_model_dir, torch.device("cpu"))
    stored = torch.load(path)
    # score 2 + (1 + 1) steps x 2 blocks of training, 3 held-out blocks of 32 tokens, as cut
    assert stored["score"].shape == (2, 32) and stored["rest"].shape == (4, 32) and stored["held_out"].shape == (3, 32)
    assert torch.equal(stored["rest"], rest) and torch.equal(torch.cat([b["input_ids"] for b in held_out]),
                                                             stored["held_out"])
    # a file that exists is what the run measures (another machine has another stdlib): not re-cut
    stored["held_out"] = stored["held_out"].flip(0)
    torch.save(stored, path)
    _, _, again = load_data(_ppl_args(path), tiny_model_dir, torch.device("cpu"))
    assert torch.equal(torch.cat([b["input_ids"] for b in again]), stored["held_out"])
    with pytest.raises(SystemExit, match="block_size=32.*block_size=64"):
        load_data(_ppl_args(path, block_size=64), tiny_model_dir, torch.device("cpu"))


def _run(root, name, objective, results, n_train=128):
    folder = root / name / "lightning_logs" / "version_0"
    folder.mkdir(parents=True)
    config = {"model": {"init_args": {"objective": objective}},
              "data": {"init_args": {"difficulty": 2, "n_train": n_train, "samples_per_problem": 4,
                                     "sample_temperature": 1.0}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "test_results.json").write_text(json.dumps({
        "n_problems": 256, "k": 4, "mean_prediction": [0.5, 1.0], "best_static": "sample_T0.3_p0.9_k4",
        "results": results, "validation_results": {"autodeco": 0.3}}))


def test_autodeco_quality_table_joins_sizes_and_refuses_unshared_baselines(tmp_path):
    from benchmarks.autodeco_quality import collect, table

    shared = {"greedy": 0.4, "sample_T1_p1_k4": 0.17, "best_static": 0.38}
    _run(tmp_path, "b", "analytic_min_p_hinge", {**shared, "mean_static": 0.2, "autodeco": 0.3})
    _run(tmp_path, "a", "legacy_ce", {**shared, "mean_static": 0.35, "autodeco": 0.37})
    (tmp_path / "rejection").mkdir()
    (tmp_path / "rejection" / "x.stats.json").write_text(json.dumps({
        "kept": 54, "kept_unfinished": 7, "problems_settings": {"n_train": 128, "difficulty": 2, "seed": 0},
        "settings": {"k": 4, "temperature": 1.0}}))
    rows = collect(tmp_path)
    assert [r["objective"] for r in rows] == ["legacy_ce", "analytic_min_p_hinge"]  # legacy CE first
    assert [r["solutions"] for r in rows] == [47, 47]  # kept minus those cut off before EOS
    text = table(rows)
    assert "greedy 0.400" in text and "| legacy_ce | 128 x 4 at 1 -> 47 | 0.50, 1.000 | 0.350 | 0.370 | 0.300 |" in text
    _run(tmp_path, "c", "legacy_ce", {**shared, "greedy": 0.5, "mean_static": 0.3, "autodeco": 0.3}, n_train=8000)
    with pytest.raises(SystemExit, match="not the same test problems"):
        table(collect(tmp_path))
