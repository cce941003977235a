"""The one scoring path (`medimg.scoring`): probabilities → labels → result rows."""

from __future__ import annotations

import numpy as np

from medimg.scoring import predicted_labels, probabilities, result_frame

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


def _asymmetric_model():
    """A fixed model whose output depends on where the bright pixels are (not flip-invariant)."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Flatten()(inputs)
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(x))
    w = np.linspace(-1, 1, 8 * 8 * 3, dtype="float32").reshape(-1, 1) / 200
    dense.set_weights([w, np.zeros(1, "float32")])
    return model


def test_tta_is_the_mean_over_the_eight_dihedral_views():
    from medimg.scoring import dihedral_views, probabilities

    x = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 3)).astype("float32")
    views = dihedral_views(x)
    assert len(views) == 8
    assert len({v.tobytes() for v in views}) == 8  # all distinct for a random image
    model = _asymmetric_model()
    plain = probabilities(model, x)
    manual = np.mean([probabilities(model, v) for v in views], axis=0)
    np.testing.assert_allclose(probabilities(model, x, tta=True), manual, rtol=1e-6)
    assert not np.allclose(manual, plain)


def test_temperature_is_applied_after_the_model():
    from medimg.analysis.calibration import apply_temperature
    from medimg.scoring import probabilities

    x = np.random.default_rng(1).uniform(0, 255, (4, 8, 8, 3)).astype("float32")
    model = _asymmetric_model()
    np.testing.assert_allclose(
        probabilities(model, x, temperature=2.0),
        apply_temperature(probabilities(model, x), 2.0),
        rtol=1e-9,
    )


def test_scoring_calls_the_model_on_pixel_bounded_slices():
    class Recorder:
        def __init__(self):
            self.batches = []

        def predict_on_batch(self, x):
            self.batches.append(len(x))
            return np.full((len(x), 1), 0.25, np.float32)

    model = Recorder()
    probs = probabilities(model, np.zeros((50, 224, 224, 3), np.float32))
    assert model.batches == [20, 20, 10] and probs.shape == (50,)
    model.batches.clear()
    probabilities(model, np.zeros((300, 64, 64, 3), np.float32))
    assert model.batches == [256, 44]  # cells: the same slices as ever
