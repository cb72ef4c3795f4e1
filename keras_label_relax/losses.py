"""Calibration-aware classification losses.

All losses take labels as integer class ids (shape `y_pred.shape[:-1]`, or with
a trailing axis of 1) or as one-hot / probability vectors of `y_pred`'s shape,
and predictions as probabilities (`from_logits=False`) or logits
(`from_logits=True`). Inputs in float16 or bfloat16 are computed in float32.

With `from_logits=False`, probabilities are normalised to sum to one and
clipped to `[epsilon, 1 - epsilon]` (`keras.config.epsilon()`) before the
logarithm, as Keras' own cross-entropies do, so the loss stays finite at
probabilities of exactly 0 and 1.
"""

import math

import keras
from keras import ops

from keras_label_relax import _labels
from keras_label_relax._api import export
from keras_label_relax._keras_compat import get_keras_mask
from keras_label_relax._keras_compat import reduce_weighted_values
from keras_label_relax._validation import check_bool
from keras_label_relax._validation import check_in_unit_interval
from keras_label_relax._validation import check_non_negative

# log(1 - p) is evaluated at log p <= this bound so that its gradient,
# -p / (1 - p), stays finite where p rounds to exactly 1.
_MAX_LOG_PROBABILITY = -1e-30


class _ClassificationLoss(keras.losses.Loss):
    """Base class: label handling, dtype handling and Keras reduction.

    Subclasses implement `_sparse_loss(class_ids, y_pred)` for integer labels
    and `_dense_loss(label_vectors, y_pred)` for vector labels, both on
    float32 (or float64) predictions, returning per-sample losses.
    """

    def __init__(self, from_logits, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = check_bool("from_logits", from_logits)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Same as `keras.losses.Loss.__call__`, except that integer labels keep
        # their dtype: Keras would cast them to the loss dtype first, and class
        # ids above 256 do not survive bfloat16.
        in_mask = get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = ops.convert_to_tensor(y_pred)
            y_true = ops.convert_to_tensor(y_true)
            if not _is_integer(y_true):
                y_true = ops.cast(y_true, _compute_dtype(y_pred))
            losses = self.call(y_true, y_pred)
            mask = _combine_masks(in_mask, get_keras_mask(losses))
            return reduce_weighted_values(
                losses,
                sample_weight=sample_weight,
                mask=mask,
                reduction=self.reduction,
                dtype=self.dtype,
            )

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_pred = ops.cast(y_pred, _compute_dtype(y_pred))
        y_true = ops.convert_to_tensor(y_true)
        if _labels.label_kind(y_true, y_pred) == _labels.SPARSE:
            return self._sparse_loss(_labels.class_ids(y_true, y_pred), y_pred)
        return self._dense_loss(ops.cast(y_true, y_pred.dtype), y_pred)

    def _sparse_loss(self, class_ids, y_pred):
        raise NotImplementedError

    def _dense_loss(self, label_vectors, y_pred):
        raise NotImplementedError

    def _log_probabilities(self, y_pred):
        return log_probabilities(y_pred, self.from_logits)

    def _observed_log_probability(self, class_ids, y_pred):
        return observed_log_probability(class_ids, y_pred, self.from_logits)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"from_logits": self.from_logits, "dtype": self._dtype_policy.name}
        )
        return config


@export
class LabelRelaxation(_ClassificationLoss):
    """Label relaxation loss (Lienen & Hüllermeier, 2021).

    The observed class `y` is relaxed to the set of distributions that put at
    least `1 - alpha` of the mass on `y`. The loss is the KL divergence from
    that set to the prediction `p`: zero when `p_y >= 1 - alpha`, otherwise
    `KL(q || p)` with `q_y = 1 - alpha` and `q_k = alpha * p_k / (1 - p_y)`.
    This collapses to the two-point form

    `(1 - alpha) * log((1 - alpha) / p_y) + alpha * log(alpha / (1 - p_y))`,

    which depends on `p` only through `p_y` and costs one cross-entropy. Its
    gradient with respect to the logits is `p - q`. With `alpha=0` it is the
    cross-entropy. Vector labels give the observed class as their argmax.

    Args:
        alpha: Relaxation degree in `[0, 1)`: the total probability mass the
            prediction may put on classes other than the observed one before
            it is penalised.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = LabelRelaxation(alpha=0.1, from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.1285...

    ```python
    model.compile(optimizer="sgd", loss=LabelRelaxation(alpha=0.1))
    ```

    Reference:
        - [Lienen and Hüllermeier, 2021. From Label Smoothing to Label
          Relaxation. AAAI](https://ojs.aaai.org/index.php/AAAI/article/view/17041)
    """

    def __init__(
        self,
        alpha=0.1,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="label_relaxation",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.alpha = check_in_unit_interval("alpha", alpha)

    def _sparse_loss(self, class_ids, y_pred):
        log_p = self._observed_log_probability(class_ids, y_pred)
        return relaxation_from_log_probability(log_p, self.alpha)

    def _dense_loss(self, label_vectors, y_pred):
        return self._sparse_loss(_labels.class_ids(label_vectors, y_pred), y_pred)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@export
class LabelSmoothing(_ClassificationLoss):
    """Cross-entropy against uniformly smoothed labels (Szegedy et al., 2016).

    The target is `(1 - alpha) * y + alpha / K` for `K` classes, where `y` is
    the one-hot (or given probability) label. Unlike
    `keras.losses.CategoricalCrossentropy(label_smoothing=...)` it also takes
    integer labels.

    Args:
        alpha: Smoothing factor in `[0, 1)`.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = LabelSmoothing(alpha=0.1, from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.4603...

    Reference:
        - [Szegedy et al., 2016. Rethinking the Inception Architecture for
          Computer Vision. CVPR](https://arxiv.org/abs/1512.00567)
    """

    def __init__(
        self,
        alpha=0.1,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="label_smoothing",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.alpha = check_in_unit_interval("alpha", alpha)

    def _sparse_loss(self, class_ids, y_pred):
        log_p = self._log_probabilities(y_pred)
        observed = take_class(log_p, class_ids)
        return -(1.0 - self.alpha) * observed - self.alpha * ops.mean(log_p, axis=-1)

    def _dense_loss(self, label_vectors, y_pred):
        log_p = self._log_probabilities(y_pred)
        cross_entropy = -ops.sum(label_vectors * log_p, axis=-1)
        return (1.0 - self.alpha) * cross_entropy - self.alpha * ops.mean(
            log_p, axis=-1
        )

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@export
class ConfidencePenalty(_ClassificationLoss):
    """Cross-entropy minus `beta` times the entropy of the prediction.

    Penalises confident (low-entropy) predictions as Pereyra et al. (2017)
    propose: `loss = CE(y, p) - beta * H(p)`. The paper on label relaxation and
    its code add `+ beta * H(p)` instead, which rewards confidence; this class
    follows Pereyra et al.

    Args:
        beta: Weight of the entropy penalty, `>= 0`.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = ConfidencePenalty(beta=0.1, from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.2360...

    Reference:
        - [Pereyra et al., 2017. Regularizing Neural Networks by Penalizing
          Confident Output Distributions](https://arxiv.org/abs/1701.06548)
    """

    def __init__(
        self,
        beta=0.1,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="confidence_penalty",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.beta = check_non_negative("beta", beta)

    def _sparse_loss(self, class_ids, y_pred):
        if _single_exp_softmax_is_faster(self.from_logits):
            shifted, log_normaliser, entropy_ = shifted_softmax_terms(y_pred)
            cross_entropy = log_normaliser - take_class(shifted, class_ids)
            return cross_entropy - self.beta * entropy_
        log_p = self._log_probabilities(y_pred)
        return -take_class(log_p, class_ids) - self.beta * entropy(log_p)

    def _dense_loss(self, label_vectors, y_pred):
        if _single_exp_softmax_is_faster(self.from_logits):
            shifted, log_normaliser, entropy_ = shifted_softmax_terms(y_pred)
            label_mass = ops.sum(label_vectors, axis=-1)
            cross_entropy = label_mass * log_normaliser - ops.sum(
                label_vectors * shifted, axis=-1
            )
            return cross_entropy - self.beta * entropy_
        log_p = self._log_probabilities(y_pred)
        cross_entropy = -ops.sum(label_vectors * log_p, axis=-1)
        return cross_entropy - self.beta * entropy(log_p)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


@export
class FocalLoss(_ClassificationLoss):
    """Focal loss (Lin et al., 2017): `-(1 - p_y)^gamma * log(p_y)`.

    Down-weights well-classified examples. There is no class-balancing
    `alpha` factor (unlike `keras.losses.CategoricalFocalCrossentropy`, whose
    default `alpha=0.25` scales the whole loss). The focal weight is computed
    in log space, so the loss and its gradient stay finite for `gamma < 1` at
    `p_y = 1`. Probability labels give `-sum_k y_k (1 - p_k)^gamma log(p_k)`.

    Args:
        gamma: Focusing parameter, `>= 0`; `gamma=0` is the cross-entropy.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = FocalLoss(gamma=2.0, from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.0495...

    Reference:
        - [Lin et al., 2017. Focal Loss for Dense Object Detection.
          ICCV](https://arxiv.org/abs/1708.02002)
    """

    def __init__(
        self,
        gamma=2.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="focal_loss",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.gamma = check_non_negative("gamma", gamma)

    def _sparse_loss(self, class_ids, y_pred):
        log_p = self._observed_log_probability(class_ids, y_pred)
        return -self._focal_weight(log_p) * log_p

    def _dense_loss(self, label_vectors, y_pred):
        log_p = self._log_probabilities(y_pred)
        return -ops.sum(label_vectors * self._focal_weight(log_p) * log_p, axis=-1)

    def _focal_weight(self, log_p):
        if self.gamma == 0.0:
            return ops.ones_like(log_p)
        return ops.exp(self.gamma * log1m_exp(log_p))

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


def log_probabilities(y_pred, from_logits):
    """Log-probabilities over the last axis from logits or probabilities."""
    if from_logits:
        return ops.log_softmax(y_pred, axis=-1)
    probabilities = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
    epsilon = keras.config.epsilon()
    return ops.log(ops.clip(probabilities, epsilon, 1.0 - epsilon))


def observed_log_probability(class_ids, y_pred, from_logits):
    """`log p_y` for integer labels, at the cost of one cross-entropy."""
    if from_logits:
        # The backends' fused sparse cross-entropy kernels.
        return -ops.sparse_categorical_crossentropy(class_ids, y_pred, from_logits=True)
    return take_class(log_probabilities(y_pred, from_logits=False), class_ids)


def take_class(values, class_ids):
    """`values[..., class_ids]`, one entry per sample."""
    picked = ops.take_along_axis(values, ops.expand_dims(class_ids, -1), axis=-1)
    return ops.squeeze(picked, -1)


def shifted_softmax_terms(logits):
    """Shifted logits, log-normaliser and entropy of `softmax(logits)`.

    `log softmax(z) = shifted - log_normaliser`. One exponential per logit,
    reused by the gradient: XLA compiles the entropy of `log_softmax` into
    several passes of exponentials, this into one.
    """
    shifted = logits - ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
    exp_shifted = ops.exp(shifted)
    normaliser = ops.sum(exp_shifted, axis=-1)
    log_normaliser = ops.log(normaliser)
    mean_shifted = ops.sum(exp_shifted * shifted, axis=-1) / normaliser
    return shifted, log_normaliser, log_normaliser - mean_shifted


def _single_exp_softmax_is_faster(from_logits):
    # Measured with benchmarks/perf_losses.py: about 4x faster than the
    # log_softmax form on JAX and 1.4x on TensorFlow, but 3x slower under
    # torch.compile, whose fused log_softmax kernel wins there.
    return from_logits and keras.backend.backend() != "torch"


def entropy(log_p):
    """Shannon entropy of the distributions given by their log-probabilities."""
    return -ops.sum(ops.exp(log_p) * log_p, axis=-1)


def log1m_exp(log_p):
    """`log(1 - exp(log_p))`, accurate for all `log_p <= 0`.

    The argument is capped just below 0, so that `log_p == 0` (p rounds to 1)
    gives a large negative value with a finite gradient instead of -inf.
    """
    log_p = ops.minimum(log_p, _MAX_LOG_PROBABILITY)
    # Mächler (2012): log1p(-exp(x)) is accurate for x < -log 2,
    # log(-expm1(x)) above it.
    near_zero = log_p > -0.6931471805599453
    safe_small = ops.where(near_zero, -1.0, log_p)
    safe_near_zero = ops.where(near_zero, log_p, -1.0)
    return ops.where(
        near_zero,
        ops.log(-ops.expm1(safe_near_zero)),
        ops.log1p(-ops.exp(safe_small)),
    )


def relaxation_from_log_probability(log_p, alpha):
    """The two-point label relaxation loss as a function of `log p_y`."""
    if alpha == 0.0:
        return -log_p
    log_inside, log_alpha = math.log(1.0 - alpha), math.log(alpha)
    kl = (1.0 - alpha) * (log_inside - log_p) + alpha * (log_alpha - log1m_exp(log_p))
    inside = log_p >= log_inside
    # `kl` and its gradient are finite everywhere (see `log1m_exp`), so the
    # masked branch cannot leak a NaN into the gradient.
    return ops.where(inside, ops.zeros_like(kl), kl)


def _compute_dtype(x):
    dtype = keras.backend.standardize_dtype(x.dtype)
    return "float64" if dtype == "float64" else "float32"


def _is_integer(x):
    dtype = keras.backend.standardize_dtype(x.dtype)
    return dtype.startswith("int") or dtype.startswith("uint")


def _combine_masks(in_mask, out_mask):
    if in_mask is not None and out_mask is not None:
        return in_mask & out_mask
    return in_mask if in_mask is not None else out_mask
