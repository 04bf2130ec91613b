"""Small Flax NNX models for the trainer and examples. None mixes examples (no BatchNorm).

* ``logreg``    -- multinomial logistic regression.
* ``mlp``       -- fully connected network, ``hidden`` sizes, tanh activations.
* ``cnn_small`` -- two 3x3 convolutions with max-pooling and a dense head, for small images (e.g. 8x8 digits).
* ``mnist_cnn`` -- the classic DP-SGD MNIST CNN (conv16 8x8/2, maxpool, conv32 4x4/2, maxpool, fc32, fc10).
* ``gabor_mlp`` -- an ``mlp`` on FIXED, data-independent Gabor (first-order scattering-like) features of an image
  (:func:`gabor_features`); Tramer & Boneh (2021), "Differentially private learning needs better features".

Tanh activations: bounded activations keep gradient norms small and even, which suits clipping
(Papernot et al. 2021, "Tempered sigmoid activations for deep learning with differential privacy").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ACTIVATIONS: dict[str, Callable] = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


def _act(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class LogReg(nnx.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(math.prod(input_shape), num_classes, rngs=rngs)

    def __call__(self, x):
        return self.dense(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (128,),
                 activation: str = "tanh", rngs: nnx.Rngs):
        if isinstance(hidden, bool) or not isinstance(hidden, (list, tuple)) or \
                not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ValueError(f"mlp option 'hidden' must be a list of layer sizes, e.g. hidden: [{hidden}] for one "
                             f"hidden layer of {hidden} units, got {hidden!r}" if isinstance(hidden, int) else
                             f"mlp option 'hidden' must be a list of positive layer sizes, e.g. [128, 64], "
                             f"got {hidden!r}")
        sizes = [math.prod(input_shape), *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        act = _act(self.activation)
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = act(layer(x))
        return self.head(x)


class CNNSmall(nnx.Module):
    def __init__(self, input_shape: Sequence[int], num_classes: int, *, channels: Sequence[int] = (16, 32),
                 hidden: int = 32, activation: str = "tanh", rngs: nnx.Rngs):
        h, w, c = input_shape
        self.conv1 = nnx.Conv(c, channels[0], (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), padding="SAME", rngs=rngs)
        flat = (h // 4) * (w // 4) * channels[1]
        self.fc = nnx.Linear(flat, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        act = _act(self.activation)
        x = nnx.max_pool(act(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.max_pool(act(self.conv2(x)), (2, 2), strides=(2, 2))
        x = act(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(x)


class MnistCNN(nnx.Module):
    """The CNN of the DP-SGD literature (Papernot et al.; Opacus's MNIST example) for 28x28x1 inputs."""

    def __init__(self, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, *,
                 activation: str = "tanh", rngs: nnx.Rngs):
        c = input_shape[-1]
        self.conv1 = nnx.Conv(c, 16, (8, 8), strides=(2, 2), padding=((3, 3), (3, 3)), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (4, 4), strides=(2, 2), padding="VALID", rngs=rngs)
        h = ((input_shape[0] + 6 - 8) // 2 + 1) - 1
        h = ((h - 4) // 2 + 1) - 1
        self.fc1 = nnx.Linear(h * h * 32, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, num_classes, rngs=rngs)
        self.activation = activation

    def __call__(self, x):
        act = _act(self.activation)
        x = nnx.max_pool(act(self.conv1(x)), (2, 2), strides=(1, 1))
        x = nnx.max_pool(act(self.conv2(x)), (2, 2), strides=(1, 1))
        x = act(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


def gabor_filters(orientations: int = 8, size: int = 5, scale: float = 1.0,
                  frequency: float = math.pi / 2) -> np.ndarray:
    """A fixed bank of complex Gabor filters ``psi_l(u) = g(u) exp(i f <u, e_l>)`` (Gaussian envelope ``g`` of
    std ``scale`` pixels, ``orientations`` directions ``e_l`` in [0, pi)), real parts made zero-mean (band-pass),
    each part scaled to unit L2 norm. Returned as HWIO ``[size, size, 1, 2 L]``: channel ``2l`` the real part,
    ``2l + 1`` the imaginary part. No data is read: the features are public."""
    r = np.arange(size) - size // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    env = np.exp(-(xx ** 2 + yy ** 2) / (2.0 * scale ** 2))
    bank = []
    for i in range(orientations):
        u = xx * math.cos(math.pi * i / orientations) + yy * math.sin(math.pi * i / orientations)
        re, im = env * np.cos(frequency * u), env * np.sin(frequency * u)
        re = re - re.mean()
        bank += [re / np.linalg.norm(re), im / np.linalg.norm(im)]
    return np.stack(bank, -1)[:, :, None, :].astype(np.float32)


_GABOR = gabor_filters()


def gabor_features(images: jax.Array) -> jax.Array:
    """Fixed features of images ``[B, H, W, C]`` (``H``, ``W`` even): per channel, the moduli ``|x * psi_l|`` of
    the 8 Gabor responses (:func:`gabor_filters`) and the image itself, each average-pooled 2x2, flattened to
    ``[B, (H/2)(W/2) 9 C]``, then normalised PER EXAMPLE to zero mean and unit RMS.

    Data-independent and per-example (no statistic of other examples), so a DP model trained on these features
    has the same sensitivity as on pixels: the features are part of the model, not of the data pipeline.
    On 8x8 digits: 144 features."""
    b, h, w, c = images.shape
    x = jnp.moveaxis(images, -1, 1).reshape(b * c, h, w, 1)
    r = jax.lax.conv_general_dilated(x, jnp.asarray(_GABOR, x.dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    mod = jnp.sqrt(r[..., 0::2] ** 2 + r[..., 1::2] ** 2 + 1e-8)
    f = jnp.concatenate([mod, x], -1)
    f = f.reshape(b * c, h // 2, 2, w // 2, 2, f.shape[-1]).mean(axis=(2, 4)).reshape(b, -1)
    f = f - f.mean(-1, keepdims=True)
    return f * jax.lax.rsqrt(jnp.mean(f ** 2, -1, keepdims=True) + 1e-12)


class GaborMLP(nnx.Module):
    """:class:`MLP` (``hidden`` sizes, ``activation``) on :func:`gabor_features` of the image: only the MLP is
    trained. Takes images ``[H, W, C]`` with even ``H`` and ``W``."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] = (128,),
                 activation: str = "tanh", rngs: nnx.Rngs):
        h, w, c = input_shape
        if h % 2 or w % 2:
            raise ValueError(f"gabor_mlp needs even image height and width, got {h}x{w}")
        self.mlp = MLP(((h // 2) * (w // 2) * 9 * c,), num_classes, hidden=hidden, activation=activation,
                       rngs=rngs)

    def __call__(self, x):
        return self.mlp(gabor_features(x))


MODELS = {"logreg": LogReg, "mlp": MLP, "cnn_small": CNNSmall, "mnist_cnn": MnistCNN, "gabor_mlp": GaborMLP}


def create(name: str, input_shape: Sequence[int], num_classes: int, *, seed: int = 0, **kwargs) -> nnx.Module:
    """Build a registered model; ``kwargs`` are the model's own options (e.g. ``hidden`` for ``mlp``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name in _IMAGE_MODELS and len(tuple(input_shape)) != 3:
        from jaxdp.data import DataValidationError
        from jaxdp.validation import _shape_hint
        shape = tuple(input_shape)
        raise DataValidationError(
            f"model {name!r} takes images [H, W, C] per example; the data's examples have shape {shape}"
            + (" (a feature vector, e.g. from a CSV)" if len(shape) == 1 else "") + f".{_shape_hint(shape)} "
            "For feature vectors use model: {name: mlp} or {name: logreg} (cnn_small is the default when a config "
            "has no model section)")
    try:
        return MODELS[name](tuple(input_shape), int(num_classes), rngs=nnx.Rngs(seed), **kwargs)
    except TypeError as e:
        raise ValueError(f"model {name!r}: bad option ({e})") from None
    except ValueError as e:
        if "unpack" not in str(e):
            raise
        from jaxdp.data import DataValidationError
        from jaxdp.validation import _shape_hint
        raise DataValidationError(f"model {name!r} takes images [H, W, C] per example; the data's examples have "
                                  f"shape {tuple(input_shape)}.{_shape_hint(tuple(input_shape))}") from None


_IMAGE_MODELS = ("cnn_small", "mnist_cnn", "gabor_mlp")


def check_model_input(model: nnx.Module, input_shape: Sequence[int], num_classes: int, name: str = "the model") -> None:
    """Refuse, before any training step is traced, a model that cannot take examples of ``input_shape`` or whose
    output is not ``[B, num_classes]`` logits; the message says what the data has and what the model did.

    Only shapes are computed (``jax.eval_shape`` on a copy of the model's state): no data, no compile."""
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, *tuple(input_shape)), jnp.float32)

    def apply(st, xx):
        return nnx.merge(graphdef, st)(xx)

    try:
        out = jax.eval_shape(apply, state, x)
    except Exception as e:  # noqa: BLE001 -- any failure here is a shape/type mismatch of the user's model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name} cannot take the data: examples have shape {tuple(input_shape)} (a batch is "
                         f"[B, {', '.join(map(str, input_shape))}]) and the model failed on it with "
                         f"{type(e).__name__}: {first}") from None
    shape = getattr(out, "shape", None)
    if shape != (2, int(num_classes)):
        raise ValueError(f"{name} must return logits of shape [B, {num_classes}] for a batch of shape "
                         f"[B, {', '.join(map(str, input_shape))}] ({num_classes} classes in the labels), "
                         + ("got a " + type(out).__name__ if shape is None else
                            f"got shape {shape} for a batch of 2 examples"))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``nnx.split(model, nnx.Param, ...)``: the graph, the trainable parameters (what DP-SGD clips and noises)
    and the rest of the state (batch statistics, RNG streams), typed as the three parts it always returns."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)   # two filters: exactly one state after params
    return graphdef, params, rest[0]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy ``[B]`` (no reduction: clipping needs each example's loss)."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]


__all__ = ["LogReg", "MLP", "CNNSmall", "MnistCNN", "GaborMLP", "gabor_filters", "gabor_features", "MODELS",
           "create", "check_model_input", "cross_entropy", "split_params"]
