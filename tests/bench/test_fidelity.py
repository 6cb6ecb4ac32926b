"""bench/fidelity.py: the measurement of how far logits land from llama.cpp's reference."""
from __future__ import annotations

import numpy as np

import ggserve.engine.model.model as model_module
from ggserve.bench import fidelity
from tests.engine.model.test_model import PROMPT, write_model


def case(ids, logits):
    return {"prompt_tokens": [0], "top10_per_position": [{"ids": ids, "logits": logits}]}


def test_differences_are_taken_at_the_reference_ids_only():
    cases = [case([2, 0], [5.0, 1.0]), case([1, 3], [4.0, 4.0])]
    ours = [np.array([[1.5, 9.0, 4.0, 0.0]]), np.array([[0.0, 4.25, 0.0, 3.0]])]
    worst, mean = fidelity.top10_diffs(ours, cases)
    assert worst == 1.0 and mean == (1.0 + 0.5 + 0.25 + 1.0) / 4  # the 9.0 at id 1 of case 0 is ignored
    worst, _ = fidelity.top10_diffs(ours, cases, against=[np.zeros((1, 4)), np.zeros((1, 4))])
    assert worst == 4.25


def test_nudged_run_moves_logits_by_last_bits_and_restores_the_kernel(tmp_path):
    write_model(tmp_path / "m.gguf")
    cases = [{"prompt_tokens": PROMPT}]
    plain = fidelity.ggserve_logits(tmp_path / "m.gguf", cases)
    nudged = fidelity.ggserve_logits(tmp_path / "m.gguf", cases, perturb_seed=1)
    assert model_module.matmul.__name__ == "matmul"  # the nudging wrapper is gone again
    assert not np.array_equal(plain[0], nudged[0])
    np.testing.assert_allclose(nudged[0], plain[0], atol=1e-3 * np.abs(plain[0]).max())
    assert np.array_equal(fidelity.ggserve_logits(tmp_path / "m.gguf", cases)[0], plain[0])


def test_missing_reference_data_is_a_clear_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GGSERVE_TESTDATA", str(tmp_path / "nowhere"))
    assert fidelity.main([]) == 2
    assert "reference data not found" in capsys.readouterr().err
