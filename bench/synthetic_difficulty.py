"""Is the synthetic default learnable but not trivial? Train one model on it and print a table.

Generates the default synthetic set (params.yaml `dataset.synthetic`), splits it by patient,
trains `--arch` at 64 px with the default augmentation and prints, per epoch, train/val/test
accuracy. The generator's goal: a small CNN lands near 90-98%, not 100%.

    python bench/synthetic_difficulty.py [--arch compact_cnn] [--epochs 12]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="compact_cnn")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()

    import keras

    from medimg.config import load_params
    from medimg.data.shards import make_dataset
    from medimg.download import run as download
    from medimg.models import build_model, get_spec
    from medimg.models.augment import build_augmenter, with_augmentation
    from medimg.split import run as split
    from medimg.validate import run as validate

    work = Path(tempfile.mkdtemp(prefix="medimg-synth-"))
    base = load_params(REPO / "params.yaml")
    paths = {k: str(work / k) for k in ("raw", "validated", "split", "reports", "gx")}
    params = base.model_copy(update={"paths": base.paths.model_copy(update=paths)})
    for stage in (download, validate, split):
        stage(params)
    keras.utils.set_random_seed(params.seed)
    common = dict(num_classes=2, seed=params.seed)
    train = make_dataset(params.paths.split, "train", args.size, 32, training=True, **common)
    val = make_dataset(params.paths.split, "val", args.size, 32, **common)
    test = make_dataset(params.paths.split, "test", args.size, 32, **common)
    model = with_augmentation(
        build_model(args.arch, (args.size, args.size, 3), 2),
        build_augmenter(params.train.augment, params.seed),
    )
    lr = get_spec(args.arch).learning_rate
    model.compile(keras.optimizers.Adam(lr), "binary_crossentropy", metrics=["accuracy"])
    print(f"{args.arch} at {args.size}px, Adam {lr}, synthetic default set")
    print("epoch | train acc | val acc | test acc")
    for epoch in range(1, args.epochs + 1):
        h = model.fit(train, validation_data=val, epochs=1, verbose=0, shuffle=False).history
        test_acc = model.evaluate(test, verbose=0)[1]
        acc, val_acc = h["accuracy"][0], h["val_accuracy"][0]
        print(f"{epoch:5d} | {acc:9.3f} | {val_acc:7.3f} | {test_acc:8.3f}")


if __name__ == "__main__":
    main()
