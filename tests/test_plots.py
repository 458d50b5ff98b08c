"""The results plot: which panel shows each run, and that a mixed sweep draws."""

from __future__ import annotations

from prunescope.plots import _panel_value, plot_accuracy_vs_sparsity

FINE_TUNED = {"method": "m", "sparsity": 0.9, "accuracy": 0.97, "accuracy_before_finetune": 0.9,
              "effective_sparsity": 0.91, "finetuned": True}
SPARSE_TRAINED = {"method": "gmp", "sparsity": 0.9, "accuracy": 0.98, "effective_sparsity": 0.9}
UNTRAINED = {"method": "cram+", "sparsity": 0.9, "accuracy": 0.95, "effective_sparsity": 0.9,
             "finetuned": False}


def test_runs_trained_after_pruning_go_left_and_one_shot_accuracy_in_the_middle():
    assert _panel_value(FINE_TUNED, "accuracy") == 0.97
    assert _panel_value(FINE_TUNED, "accuracy_before_finetune") == 0.9
    assert _panel_value(SPARSE_TRAINED, "accuracy") == 0.98
    assert _panel_value(SPARSE_TRAINED, "accuracy_before_finetune") is None
    assert _panel_value(UNTRAINED, "accuracy") is None
    assert _panel_value(UNTRAINED, "accuracy_before_finetune") == 0.95
    assert _panel_value(UNTRAINED, "effective_sparsity") == 0.9


def test_a_mixed_sweep_draws_a_png(tmp_path):
    results = {"model": "lenet300", "dataset": "mnist", "dense": {"accuracy": 0.98},
               "runs": [FINE_TUNED, SPARSE_TRAINED, UNTRAINED,
                        {**UNTRAINED, "sparsity": 0.98, "accuracy": 0.3}]}
    path = tmp_path / "plot.png"
    plot_accuracy_vs_sparsity(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
