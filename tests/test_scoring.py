"""The one scoring path (`medimg.scoring`): probabilities → labels → result rows."""

from __future__ import annotations

import numpy as np

from medimg.scoring import predicted_labels, result_frame

CLASSES = ["Uninfected", "Parasitized"]


def test_result_frame_binary_and_multiclass():
    binary = result_frame(np.array([0.9, 0.2, 0.5]), CLASSES, threshold=0.5)
    assert list(binary["class"]) == ["Parasitized", "Uninfected", "Parasitized"]
    np.testing.assert_allclose(binary["probability"], [0.9, 0.8, 0.5])
    assert list(binary.columns) == ["class", "probability", "p_Parasitized", "threshold"]
    assert list(result_frame(np.array([0.3]), CLASSES, threshold=0.25)["class"]) == ["Parasitized"]
    multi = result_frame(np.array([[0.1, 0.7, 0.2]]), ["a", "b", "c"], threshold=0.5)
    assert multi.loc[0, "class"] == "b" and multi.loc[0, "probability"] == 0.7
    assert {"p_a", "p_b", "p_c"} <= set(multi.columns)


def test_predicted_labels_threshold_and_argmax():
    np.testing.assert_array_equal(predicted_labels(np.array([0.2, 0.5, 0.7]), 0.6), [0, 0, 1])
    np.testing.assert_array_equal(predicted_labels(np.array([[0.9], [0.1]])), [1, 0])
    np.testing.assert_array_equal(predicted_labels(np.array([[0.1, 0.7, 0.2]])), [1])
