"""compact_cnn: a < 1 MB malaria-cell classifier meant to match the seeds' 15-24M-parameter models.

Seed 000's stated goal was one small model for edge devices, yet its ResNet file was 17.7 MB;
this is the zoo's answer. Design choices, and why:

- Rescaling inside the model: the exported file is the whole contract (raw 0-255 RGB in).
- Full-resolution stem (3x3 conv, stride 1): at 64 px a ring-form parasite is only a few
  pixels across; a strided stem (MobileNet style) would average it away before any feature
  can see it. A full conv on 3 channels costs only ~650 weights. The first depthwise stage
  is strided (see STAGES): depthwise backprop is slow on CPU, where this model must train.
- Depthwise-separable 3x3 blocks (depthwise → BN → ReLU → 1x1 → BN): ~8x fewer weights than
  full 3x3 convs of the same width, which is what makes 4 stages fit the 1 MB budget.
- Identity residuals on every non-downsampling block: free in parameters, and they keep the
  deeper stages trainable with a high Adam learning rate (2e-3) in a few epochs.
- Squeeze-and-excitation once per stage: the decisive cue is stain colour (purple chromatin
  against a pink cell), a per-channel signal that SE reweights for ~1% extra parameters; once
  per stage rather than per block keeps that overhead small.
- BN + plain ReLU, no swish/hard-swish: BN folds into the convs and ReLU quantises cleanly to
  int8 (TFLite/ONNX edge runtimes), so the exported model can shrink to ~1/4 again.
- Global average pooling, dropout, head: no Flatten-sized dense layer (simple_cnn spends 14.7M
  of its 15.1M parameters there), and the model accepts any input size.
- He init on each kernel's true fan-in and BN momentum 0.9: with Keras' defaults the stacked
  depthwise/BN blocks trained fine but collapsed to one constant output in inference mode
  after short runs (see the constants below).

At the default width it has 125,301 parameters (~0.75 MB as a .keras file); `width` scales
all channel counts (rounded to multiples of 8) for accuracy/size sweeps (width 1.2 is ~0.93 MB,
1.25 already exceeds 1 MB).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from medimg.errors import ConfigError
from medimg.models.layers import (
    check_bool,
    check_fraction,
    check_non_negative,
    classification_head,
    regularizer,
    unit_rescaling,
)
from medimg.models.registry import register_model

STEM_FILTERS = 24
# BN moving statistics that converge within a few hundred steps: the default 0.99 leaves about
# half of the initial variance (1.0) in them after one epoch of a small dataset, and 17 BNs
# evaluated with such stale statistics collapse every inference-mode output to one constant.
BN_MOMENTUM = 0.9


def _depthwise_init() -> keras.initializers.Initializer:
    """He init over a depthwise kernel's true fan-in of 9.

    Keras' default Glorot counts 9*C inputs for a (3, 3, C, 1) kernel, so outputs start with
    ~C times too little variance; its "fan_out" is exactly the 9 inputs each output sees
    (EfficientNet's choice too).
    """
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")


# (channels, blocks, first stride) per stage; 64 px input → 32, 16, 8, 4 px feature maps.
# Stage 1 is strided: the stem still sees every pixel at full resolution (a parasite's dark
# dot survives one 3x3 conv), and halving the first depthwise stage's map made training 2.3x
# faster on CPU (98 vs 42 images/s at 64 px, same 125,301 parameters).
STAGES = ((32, 2, 2), (64, 2, 2), (128, 2, 2), (176, 2, 2))


def _round8(value: float) -> int:
    """Channel counts as multiples of 8: what SIMD/NPU kernels are fastest on."""
    return max(8, int(value + 4) // 8 * 8)


def _ds_block(
    x: Any,
    filters: int,
    stride: int,
    reg: keras.regularizers.Regularizer | None,
    name: str,
) -> Any:
    residual = stride == 1 and x.shape[-1] == filters
    y = layers.DepthwiseConv2D(
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=_depthwise_init(),
        depthwise_regularizer=reg,
        name=f"{name}_dw",
    )(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_dw_bn")(y)
    y = layers.ReLU(name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(
        filters,
        1,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=reg,
        name=f"{name}_pw",
    )(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_pw_bn")(y)
    if residual:
        y = layers.Add(name=f"{name}_add")([x, y])
    return layers.ReLU(name=f"{name}_relu")(y)


def _squeeze_excite(x: Any, name: str) -> Any:
    channels = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    s = layers.Conv2D(max(8, channels // 4), 1, activation="relu", name=f"{name}_reduce")(s)
    s = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_expand")(s)
    return layers.Multiply(name=f"{name}_scale")([x, s])


@register_model(
    "compact_cnn", default_size=64, optimizer="adam", learning_rate=2e-3, schedule="plateau"
)
def compact_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    width: float = 1.0,
    dropout: float = 0.2,
    se: bool = True,
    l2: float = 0.0,
) -> keras.Model:
    """Edge model (< 1 MB): full-res stem, 4 depthwise-separable residual stages with SE, GAP.

    Params: `width` (channel multiplier, 0.25-2), `dropout` before the head (0.2), `se`
    (squeeze-and-excitation per stage, true), `l2` (kernel L2 factor, 0).
    """
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0.25 <= width <= 2:
        raise ConfigError(f"compact_cnn: width must be a number in [0.25, 2], got {width!r}")
    dropout = check_fraction("compact_cnn", "dropout", dropout)
    se = check_bool("compact_cnn", "se", se)
    reg = regularizer(check_non_negative("compact_cnn", "l2", l2))

    inputs = keras.Input(shape=input_shape, name="image")
    x = unit_rescaling()(inputs)
    x = layers.Conv2D(
        _round8(STEM_FILTERS * width),
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=reg,
        name="stem_conv",
    )(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, (channels, blocks, stride) in enumerate(STAGES, start=1):
        filters = _round8(channels * width)
        for b in range(1, blocks + 1):
            x = _ds_block(x, filters, stride if b == 1 else 1, reg, name=f"stage{s}_block{b}")
        if se:
            x = _squeeze_excite(x, name=f"stage{s}_se")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = classification_head(x, num_classes, kernel_regularizer=reg)
    return keras.Model(inputs, outputs, name="compact_cnn")
