import keras
import numpy as np

from medimg.config import AugmentConfig
from medimg.models.augment import RandomAffine, build_augmenter, with_augmentation


def images(n: int = 8, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")


def run(layer: keras.layers.Layer, x: np.ndarray, training: bool = True) -> np.ndarray:
    return keras.ops.convert_to_numpy(layer(x, training=training))


def test_off_at_evaluation():
    x = images()
    aug = build_augmenter(AugmentConfig(), seed=0)
    np.testing.assert_array_equal(run(aug, x, training=False), x)


def test_zero_ranges_are_identity():
    x = images()
    np.testing.assert_allclose(run(RandomAffine(seed=0), x), x, atol=1e-3)


def test_flips_are_exact_mirrors_and_vary_per_image():
    x = images(32)
    y = run(RandomAffine(horizontal_flip=True, vertical_flip=True, seed=1), x)
    kinds = set()
    for xi, yi in zip(x, y, strict=True):
        candidates = {
            "none": xi,
            "h": xi[:, ::-1],
            "v": xi[::-1, :],
            "hv": xi[::-1, ::-1],
        }
        match = [k for k, c in candidates.items() if np.allclose(yi, c, atol=1e-3)]
        assert len(match) == 1
        kinds.add(match[0])
    assert kinds == {"none", "h", "v", "hv"}


def test_seeded_and_random_per_image():
    x = np.repeat(images(1), 6, axis=0)
    cfg = AugmentConfig()
    a, b = run(build_augmenter(cfg, 3), x), run(build_augmenter(cfg, 3), x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])


def test_pure_shift_moves_content_within_bounds():
    x = np.zeros((16, 32, 32, 3), "float32")
    x[:, 15:17, 15:17] = 255.0
    y = run(RandomAffine(shift=0.1, seed=0), x)
    for yi in y:
        rows, cols = np.nonzero(yi[..., 0] > 127)
        assert abs(rows.mean() - 15.5) <= 0.1 * 32 + 1
        assert abs(cols.mean() - 15.5) <= 0.1 * 32 + 1
    assert y.shape == x.shape and y.dtype == np.float32


def test_rotation_keeps_centre_and_range():
    x = images(16, 17)
    y = run(RandomAffine(rotation_deg=90.0, seed=0), x)
    np.testing.assert_allclose(y[:, 8, 8], x[:, 8, 8], atol=1e-3)
    assert y.min() >= 0 and y.max() <= 255


def test_training_the_wrapper_trains_the_saved_model_which_has_no_augmenter(tmp_path):
    inner = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    wrapper = with_augmentation(inner, build_augmenter(AugmentConfig(), 0))
    x = images(16, 8)
    before = inner.predict(x, verbose=0)
    wrapper.compile("sgd", "mse")
    wrapper.fit(x, np.ones((16, 1)), epochs=1, verbose=0)
    inner.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert not any(isinstance(layer, RandomAffine) for layer in loaded.layers)
    after = loaded.predict(x, verbose=0)
    assert not np.allclose(after, before)  # the wrapper's fit moved the shared weights
    np.testing.assert_allclose(wrapper.predict(x, verbose=0), after, rtol=1e-5, atol=1e-5)


def test_config_round_trip():
    layer = build_augmenter(AugmentConfig(rotation_deg=10, vertical_flip=False), 5)
    clone = RandomAffine.from_config(layer.get_config())
    assert clone.rotation_deg == 10 and not clone.vertical_flip and clone.seed == 5


def test_color_jitter_is_off_at_inference_and_bounded_in_training():
    import keras
    import numpy as np

    from medimg.models.augment import RandomColor

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    layer = RandomColor(brightness=0.3, contrast=0.3, saturation=0.5, hue=0.1, seed=1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images)
    per_image = np.abs(out - images).mean(axis=(1, 2, 3))
    assert len(np.unique(per_image.round(3))) == len(images)  # one draw per image


def test_color_matrices_identity_and_grey_stays_grey():
    import keras
    import numpy as np

    from medimg.models.augment import RandomColor

    still = RandomColor(seed=0)  # every jitter 0: the identity matrix
    m = keras.ops.convert_to_numpy(still.matrices(3))
    np.testing.assert_allclose(m, np.broadcast_to(np.eye(3), (3, 3, 3)), atol=1e-5)
    grey = np.full((4, 8, 8, 3), 120.0, "float32")
    hue_only = RandomColor(hue=0.5, saturation=0.5, seed=3)
    out = keras.ops.convert_to_numpy(hue_only(grey, training=True))
    np.testing.assert_allclose(out, grey, atol=1e-3)  # no chroma: hue/saturation change nothing


def test_build_augmenter_adds_color_only_when_asked():
    from medimg.config import AugmentConfig, ColorJitterConfig
    from medimg.models.augment import RandomAffine, build_augmenter

    assert isinstance(build_augmenter(AugmentConfig(), seed=0), RandomAffine)
    both = build_augmenter(AugmentConfig(color=ColorJitterConfig(hue=0.05)), seed=0)
    assert [type(layer).__name__ for layer in both.layers] == ["RandomAffine", "RandomColor"]
