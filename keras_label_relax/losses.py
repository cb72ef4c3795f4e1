"""Calibration-aware classification losses.

Every loss comes as a function that returns per-sample losses
(`label_relaxation(y_true, y_pred, alpha)`), which is what one composes, jits
and vmaps, and as a `keras.losses.Loss` class around that function
(`LabelRelaxation(alpha)`), which is what `compile()` and saving see.

All losses take labels as integer class ids (shape `y_pred.shape[:-1]`, or with
a trailing axis of 1) or as one-hot / probability vectors of `y_pred`'s shape,
and predictions as probabilities (`from_logits=False`) or logits
(`from_logits=True`). Inputs in float16 or bfloat16 are computed in float32,
float64 inputs in float64.

With `from_logits=False`, probabilities are normalised to sum to one and
clipped to `[epsilon, 1 - epsilon]` (`keras.config.epsilon()`) before the
logarithm, as Keras' own cross-entropies do, so the loss stays finite at
probabilities of exactly 0 and 1.

The functions take their hyper-parameters as Python numbers, which are
checked as the classes check them, or as scalar tensors, which can be traced
(`jax.jit`) and batched (`jax.vmap`): one compiled step can then train models
that each have their own hyper-parameter. Tensors are not checked; a tensor
outside the documented range gives NaN losses.
"""

import functools
import math
import numbers
import typing

import keras
from keras import ops

from keras_label_relax import _labels
from keras_label_relax._api import export
from keras_label_relax._keras_compat import get_keras_mask
from keras_label_relax._keras_compat import reduce_weighted_values
from keras_label_relax._validation import check_at_least
from keras_label_relax._validation import check_bool
from keras_label_relax._validation import check_in_unit_interval
from keras_label_relax._validation import check_non_negative
from keras_label_relax._validation import check_sample_dependent_gammas

# log(1 - p) is evaluated at log p <= this bound so that its gradient,
# -p / (1 - p), stays finite where p rounds to exactly 1.
_MAX_LOG_PROBABILITY = -1e-30
# Below any logit or log-probability the losses meet, finite in float32.
_LOWEST = -3.0e38


class _ClassificationLoss(keras.losses.Loss):
    """Base class of the loss classes: Keras reduction around a loss function.

    Subclasses implement `call(y_true, y_pred)` by calling their function with
    their hyper-parameters, and add those to `get_config`.
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
            if sample_weight is None and mask is None:
                if _plain_mean_applies(self.reduction, losses):
                    return _plain_mean(losses, self.dtype)
            return reduce_weighted_values(
                losses,
                sample_weight=sample_weight,
                mask=mask,
                reduction=self.reduction,
                dtype=self.dtype,
            )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"from_logits": self.from_logits, "dtype": self._dtype_policy.name}
        )
        return config


def _plain_mean_applies(reduction, losses):
    # Keras' reduction without weights or masks is a mean; its bookkeeping
    # costs 0.26 ms a call on eager PyTorch, a fifth of a cross-entropy's step
    # at K = 10. On TensorFlow it also divides by the replicas in sync.
    return (
        keras.backend.backend() != "tensorflow"
        and reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight")
        and tuple(losses.shape) not in ((), (0,))
        and None not in losses.shape
    )


def _plain_mean(losses, dtype):
    """`keras.losses.Loss`'s mean of `losses`, 0 for no losses."""
    values = ops.convert_to_tensor(losses, dtype=dtype)
    return ops.sum(values) / max(math.prod(values.shape), 1)


# The paper's four losses.


@export
def label_relaxation(y_true, y_pred, alpha, from_logits=False):
    """Per-sample label relaxation loss; see `LabelRelaxation`.

    Args:
        y_true: Integer class ids, or class vectors whose argmax is the class.
        y_pred: Probabilities or logits, classes on the last axis.
        alpha: Relaxation degree in `[0, 1)`, a Python number or a scalar
            tensor. A tensor is not checked: below 0 or from 1 on, the losses
            are NaN.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = label_relaxation([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ...                           alpha=0.1, from_logits=True)
    >>> [round(float(x), 4) for x in losses]
    [0.0, 0.257]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    alpha = _hyper_parameter("alpha", alpha, check_in_unit_interval, y_pred.dtype)
    return _run_loss("label_relaxation", y_true, y_pred, from_logits, alpha)


def _label_relaxation(y_true, y_pred, from_logits, alpha):
    if _logit_kernel_applies(y_true, y_pred, from_logits, alpha):
        return _run_logit_kernel(_RELAXATION_KERNEL, y_true, y_pred, alpha)
    class_ids = _labels.class_ids(y_true, y_pred)
    log_p = observed_log_probability(class_ids, y_pred, from_logits)
    losses = relaxation_from_log_probability(log_p, alpha)
    return _nan_outside(losses, alpha, low=0.0, high=1.0)


@export
def label_smoothing(y_true, y_pred, alpha, from_logits=False):
    """Per-sample cross-entropy against smoothed labels; see `LabelSmoothing`.

    Args:
        y_true: Integer class ids, or one-hot / probability vectors.
        y_pred: Probabilities or logits, classes on the last axis.
        alpha: Smoothing factor in `[0, 1)`, a Python number or a scalar
            tensor. A tensor is not checked: outside `[0, 1)` the losses are
            NaN.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = label_smoothing([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ...                          alpha=0.1, from_logits=True)
    >>> [round(float(x), 4) for x in losses]
    [0.3026, 0.6181]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    alpha = _hyper_parameter("alpha", alpha, check_in_unit_interval, y_pred.dtype)
    return _run_loss("label_smoothing", y_true, y_pred, from_logits, alpha)


def _label_smoothing(y_true, y_pred, from_logits, alpha):
    sparse = _is_sparse(y_true, y_pred)
    if sparse and from_logits and _has_fused_label_smoothing(alpha):
        return _torch_fused_label_smoothing(y_true, y_pred, alpha)
    if sparse and from_logits and keras.backend.backend() == "jax":
        # Keras' JAX cross-entropy builds a one-hot and a log-softmax, whose
        # gradient exponentiates again; one exponential serves both here.
        class_ids = _labels.class_ids(y_true, y_pred)
        shifted, _, normaliser = _shifted_exponentials(y_pred)
        log_normaliser = ops.log(normaliser)
        observed = take_class(shifted, class_ids)
        losses = (
            log_normaliser - observed + alpha * (observed - _mean_over_classes(shifted))
        )
    elif sparse and from_logits:
        # -(1 - a) log p_y - a mean_k log p_k = CE + a (z_y - mean_k z_k): the
        # fused cross-entropy plus one gather and one mean.
        class_ids = _labels.class_ids(y_true, y_pred)
        cross_entropy = -observed_log_probability(class_ids, y_pred, True)
        spread = take_class(y_pred, class_ids) - _mean_over_classes(y_pred)
        losses = cross_entropy + alpha * spread
    else:
        log_p = log_probabilities(y_pred, from_logits)
        cross_entropy = _cross_entropy(y_true, y_pred, log_p, sparse)
        losses = (1.0 - alpha) * cross_entropy - alpha * _mean_over_classes(log_p)
    return _nan_outside(losses, alpha, low=0.0, high=1.0)


@export
def confidence_penalty(y_true, y_pred, beta, from_logits=False):
    """Per-sample cross-entropy minus `beta` times the prediction's entropy.

    See `ConfidencePenalty`.

    Args:
        y_true: Integer class ids, or one-hot / probability vectors.
        y_pred: Probabilities or logits, classes on the last axis.
        beta: Weight of the entropy penalty, `>= 0`, a Python number or a
            scalar tensor. A negative tensor gives NaN losses.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = confidence_penalty([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ...                             beta=0.1, from_logits=True)
    >>> [round(float(x), 4) for x in losses]
    [0.0182, 0.4539]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    beta = _hyper_parameter("beta", beta, check_non_negative, y_pred.dtype)
    return _run_loss("confidence_penalty", y_true, y_pred, from_logits, beta)


def _confidence_penalty(y_true, y_pred, from_logits, beta):
    sparse = _is_sparse(y_true, y_pred)
    if _single_exp_softmax_is_faster(from_logits):
        shifted, log_normaliser, entropy_ = shifted_softmax_terms(y_pred)
        if sparse:
            class_ids = _labels.class_ids(y_true, y_pred)
            cross_entropy = log_normaliser - take_class(shifted, class_ids)
        else:
            label_vectors = _label_vectors(y_true, y_pred)
            label_mass = ops.sum(label_vectors, axis=-1)
            cross_entropy = label_mass * log_normaliser - ops.sum(
                label_vectors * shifted, axis=-1
            )
    else:
        log_p = log_probabilities(y_pred, from_logits)
        entropy_ = entropy(log_p)
        cross_entropy = _cross_entropy(y_true, y_pred, log_p, sparse)
    losses = cross_entropy - beta * entropy_
    return _nan_outside(losses, beta, low=0.0)


@export
def focal_loss(y_true, y_pred, gamma, from_logits=False):
    """Per-sample focal loss `-(1 - p_y)^gamma log p_y`; see `FocalLoss`.

    Args:
        y_true: Integer class ids, or one-hot / probability vectors.
        y_pred: Probabilities or logits, classes on the last axis.
        gamma: Focusing parameter, `>= 0`, a Python number or a scalar
            tensor. A negative tensor gives NaN losses.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = focal_loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ...                     gamma=2.0, from_logits=True)
    >>> [round(float(x), 4) for x in losses]
    [0.0, 0.0991]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    gamma = _hyper_parameter("gamma", gamma, check_non_negative, y_pred.dtype)
    return _run_loss("focal_loss", y_true, y_pred, from_logits, gamma)


def _focal_loss(y_true, y_pred, from_logits, gamma):
    if _logit_kernel_applies(y_true, y_pred, from_logits, gamma):
        return _run_logit_kernel(_FOCAL_KERNEL, y_true, y_pred, gamma)
    if _is_sparse(y_true, y_pred):
        class_ids = _labels.class_ids(y_true, y_pred)
        log_p = observed_log_probability(class_ids, y_pred, from_logits)
        losses = -focal_weight(log_p, gamma) * log_p
    else:
        log_p = log_probabilities(y_pred, from_logits)
        weighted = _label_vectors(y_true, y_pred) * focal_weight(log_p, gamma)
        losses = -ops.sum(weighted * log_p, axis=-1)
    return _nan_outside(losses, gamma, low=0.0)


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
    `label_relaxation` is the same loss as a function.

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

    def call(self, y_true, y_pred):
        return label_relaxation(y_true, y_pred, self.alpha, self.from_logits)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@export
class LabelSmoothing(_ClassificationLoss):
    """Cross-entropy against uniformly smoothed labels (Szegedy et al., 2016).

    The target is `(1 - alpha) * y + alpha / K` for `K` classes, where `y` is
    the one-hot (or given probability) label. Unlike
    `keras.losses.CategoricalCrossentropy(label_smoothing=...)` it also takes
    integer labels. `label_smoothing` is the same loss as a function.

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

    def call(self, y_true, y_pred):
        return label_smoothing(y_true, y_pred, self.alpha, self.from_logits)

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


@export
class ConfidencePenalty(_ClassificationLoss):
    """Cross-entropy minus `beta` times the entropy of the prediction.

    Penalises confident (low-entropy) predictions as Pereyra et al. (2017)
    propose: `loss = CE(y, p) - beta * H(p)`. The paper on label relaxation and
    its code add `+ beta * H(p)` instead, which rewards confidence; this class
    follows Pereyra et al. `confidence_penalty` is the same loss as a function.

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

    def call(self, y_true, y_pred):
        return confidence_penalty(y_true, y_pred, self.beta, self.from_logits)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


@export
class FocalLoss(_ClassificationLoss):
    """Focal loss (Lin et al., 2017): `-(1 - p_y)^gamma * log(p_y)`.

    Down-weights well-classified examples. There is no class-balancing
    `alpha` factor (unlike `keras.losses.CategoricalFocalCrossentropy`, whose
    default `alpha=0.25` scales the whole loss). `1 - p_y` is computed from
    `log p_y` and kept above 0, so the loss and its gradient stay finite for
    `gamma < 1` at `p_y = 1`. Probability labels give
    `-sum_k y_k (1 - p_k)^gamma log(p_k)`. `focal_loss` is the same loss as a
    function.

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

    def call(self, y_true, y_pred):
        return focal_loss(y_true, y_pred, self.gamma, self.from_logits)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


# Train-time calibration losses that came after label relaxation.


@export
def sample_dependent_focal_loss(
    y_true, y_pred, thresholds=(0.2,), gammas=(5.0, 3.0), from_logits=False
):
    """Per-sample focal loss with a gamma picked from `p_y`.

    See `SampleDependentFocalLoss`.

    Args:
        y_true: Integer class ids, or one-hot / probability vectors.
        y_pred: Probabilities or logits, classes on the last axis.
        thresholds: Strictly increasing probabilities inside (0, 1), a
            sequence of Python numbers or a 1-D tensor (not checked).
        gammas: One focusing parameter more than `thresholds`, each `>= 0`:
            `gammas[i]` applies from `thresholds[i - 1]` (inclusive) up to
            `thresholds[i]`.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = sample_dependent_focal_loss(
    ...     [0, 1], [[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]])
    >>> [round(float(x), 4) for x in losses]
    [1.3597, 0.0327]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    if not (_is_tensor(thresholds) or _is_tensor(gammas)):
        thresholds, gammas = check_sample_dependent_gammas(thresholds, gammas)
    return _run_loss(
        "sample_dependent_focal_loss", y_true, y_pred, from_logits, thresholds, gammas
    )


def _sample_dependent_focal_loss(y_true, y_pred, from_logits, thresholds, gammas):
    if _logit_kernel_applies(y_true, y_pred, from_logits, thresholds, gammas):
        return _run_logit_kernel(
            _SAMPLE_DEPENDENT_FOCAL_KERNEL, y_true, y_pred, thresholds, gammas
        )
    if _is_sparse(y_true, y_pred):
        class_ids = _labels.class_ids(y_true, y_pred)
        log_p = observed_log_probability(class_ids, y_pred, from_logits)
        gamma = _piecewise_gamma(log_p, thresholds, gammas)
        return -focal_weight(log_p, gamma) * log_p
    log_p = log_probabilities(y_pred, from_logits)
    gamma = _piecewise_gamma(log_p, thresholds, gammas)
    weighted = _label_vectors(y_true, y_pred) * focal_weight(log_p, gamma)
    return -ops.sum(weighted * log_p, axis=-1)


@export
def dual_focal_loss(y_true, y_pred, gamma, from_logits=False):
    """Per-sample dual focal loss `-(1 - p_y + p_j)^gamma log p_y`.

    See `DualFocalLoss`.

    Args:
        y_true: Integer class ids, or class vectors whose argmax is the class.
        y_pred: Probabilities or logits, classes on the last axis.
        gamma: Focusing parameter, `>= 0`, a Python number or a scalar
            tensor. A negative tensor gives NaN losses.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = dual_focal_loss([0, 1], [[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]],
    ...                          gamma=2.0)
    >>> [round(float(x), 4) for x in losses]
    [1.8651, 0.2503]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    gamma = _hyper_parameter("gamma", gamma, check_non_negative, y_pred.dtype)
    return _run_loss("dual_focal_loss", y_true, y_pred, from_logits, gamma)


def _dual_focal_loss(y_true, y_pred, from_logits, gamma):
    if _logit_kernel_applies(y_true, y_pred, from_logits, gamma):
        return _run_logit_kernel(_dual_focal_kernel, y_true, y_pred, gamma)
    class_ids = _labels.class_ids(y_true, y_pred)
    # Ranks come from `y_pred` itself (logits, or probabilities: the same
    # order), so the label's own entry is never "below" itself by rounding.
    observed = ops.expand_dims(take_class(y_pred, class_ids), -1)
    below = y_pred < observed
    # Entries not below the label's get a finite value that never wins the
    # max (an infinity turns into NaN gradients under torch.compile); rows
    # with nothing below get p_j = 0.
    if from_logits:
        log_p = observed_log_probability(class_ids, y_pred, True)
        # j by an argmax without gradient and z_j by a gather, whose gradient
        # is N values rather than the K-wide mask of a max's: measured 3.1x ->
        # 1.6x of the cross-entropy under torch.compile at K = 1000.
        any_below = ops.any(below, axis=-1)
        j = ops.argmax(ops.stop_gradient(ops.where(below, y_pred, _LOWEST)), axis=-1)
        z_y = ops.squeeze(observed, -1)
        # Rows with nothing below take z_j = z_y, a finite p_j masked below.
        z_j = ops.where(any_below, take_class(y_pred, j), z_y)
        # log p_j = z_j - logsumexp(z) = z_j - z_y + log p_y.
        log_p_j = z_j - z_y + log_p
    else:
        all_log_p = log_probabilities(y_pred, False)
        log_p = take_class(all_log_p, class_ids)
        log_p_j = ops.max(ops.where(below, all_log_p, _LOWEST), axis=-1)
        any_below = log_p_j > _LOWEST
    p_j = ops.where(any_below, ops.exp(log_p_j), ops.zeros_like(log_p_j))
    base = one_minus_probability(log_p) + p_j
    losses = -_power(base, gamma) * log_p
    return _nan_outside(losses, gamma, low=0.0)


@export
def margin_label_smoothing(y_true, y_pred, margin, weight, from_logits=True):
    """Per-sample margin-based label smoothing (MbLS) on logits.

    See `MarginLabelSmoothing`.

    Args:
        y_true: Integer class ids, or one-hot / probability vectors.
        y_pred: Logits, classes on the last axis.
        margin: Logit distance to the largest logit above which a class is
            penalised, `>= 0`, a Python number or a scalar tensor.
        weight: Weight of the margin penalty, `>= 0`, a Python number or a
            scalar tensor. A negative tensor `margin` or `weight` gives NaN
            losses.
        from_logits: Must be `True`: the penalty is defined on logits.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = margin_label_smoothing([0, 1], [[12.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    ...                                 margin=10.0, weight=0.1)
    >>> [round(float(x), 4) for x in losses]
    [0.1333, 0.5514]
    """
    _check_margin_from_logits(from_logits)
    y_true, y_pred = _prepare(y_true, y_pred)
    margin = _hyper_parameter("margin", margin, check_non_negative, y_pred.dtype)
    weight = _hyper_parameter("weight", weight, check_non_negative, y_pred.dtype)
    return _run_loss("margin_label_smoothing", y_true, y_pred, True, margin, weight)


def _margin_label_smoothing(y_true, y_pred, from_logits, margin, weight):
    if _logit_kernel_applies(y_true, y_pred, True, margin, weight):
        return _run_logit_kernel(_margin_kernel, y_true, y_pred, margin, weight)
    if _is_sparse(y_true, y_pred):
        class_ids = _labels.class_ids(y_true, y_pred)
        cross_entropy = -observed_log_probability(class_ids, y_pred, True)
    else:
        log_p = log_probabilities(y_pred, True)
        cross_entropy = _cross_entropy(y_true, y_pred, log_p, sparse=False)
    # The largest logit by a gather at its argmax: its gradient is a scatter
    # of B values rather than the K-wide mask of `max`'s (measured: 4.5x -> 3.2x
    # of a cross-entropy on eager PyTorch at K = 1000).
    top = ops.argmax(ops.stop_gradient(y_pred), axis=-1)
    ceiling = ops.expand_dims(take_class(y_pred, top), -1) - margin
    penalty = _mean_over_classes(ops.relu(ceiling - y_pred))
    losses = cross_entropy + weight * penalty
    losses = _nan_outside(losses, margin, low=0.0)
    return _nan_outside(losses, weight, low=0.0)


@export
def poly_loss(y_true, y_pred, epsilon, from_logits=False):
    """Per-sample Poly-1 loss `CE + epsilon * (1 - p_y)`; see `PolyLoss`.

    Args:
        y_true: Integer class ids, or one-hot / probability vectors.
        y_pred: Probabilities or logits, classes on the last axis.
        epsilon: Coefficient of the first polynomial term, `>= -1`, a Python
            number or a scalar tensor. A tensor below -1 gives NaN losses.
        from_logits: Whether `y_pred` holds logits rather than probabilities.

    Returns:
        Losses of shape `y_pred.shape[:-1]`, float32 (float64 for float64
        `y_pred`).

    Example:

    >>> losses = poly_loss([0, 1], [[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]],
    ...                    epsilon=1.0)
    >>> [round(float(x), 4) for x in losses]
    [3.2026, 0.9108]
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    epsilon = _hyper_parameter("epsilon", epsilon, _check_epsilon, y_pred.dtype)
    return _run_loss("poly_loss", y_true, y_pred, from_logits, epsilon)


def _poly_loss(y_true, y_pred, from_logits, epsilon):
    if _logit_kernel_applies(y_true, y_pred, from_logits, epsilon):
        return _run_logit_kernel(_POLY_KERNEL, y_true, y_pred, epsilon)
    if _is_sparse(y_true, y_pred):
        class_ids = _labels.class_ids(y_true, y_pred)
        log_p = observed_log_probability(class_ids, y_pred, from_logits)
        losses = -log_p - epsilon * ops.expm1(log_p)
    else:
        label_vectors = _label_vectors(y_true, y_pred)
        log_p = log_probabilities(y_pred, from_logits)
        cross_entropy = -ops.sum(label_vectors * log_p, axis=-1)
        p_true = ops.sum(label_vectors * ops.exp(log_p), axis=-1)
        losses = cross_entropy + epsilon * (1.0 - p_true)
    return _nan_outside(losses, epsilon, low=-1.0)


@export
class SampleDependentFocalLoss(_ClassificationLoss):
    """Focal loss with a per-sample gamma (FLSD, Mukhoti et al., 2020).

    `-(1 - p_y)^gamma(p_y) log p_y`, where `gamma(p_y)` is piecewise constant:
    `gammas[0]` below `thresholds[0]`, `gammas[i]` from `thresholds[i - 1]`
    (inclusive) up to `thresholds[i]`, `gammas[-1]` from `thresholds[-1]` on.
    The default is FLSD-53: gamma 5 where `p_y < 0.2`, else 3. The choice of
    gamma carries no gradient. Probability labels give
    `-sum_k y_k (1 - p_k)^gamma(p_k) log(p_k)`.
    `sample_dependent_focal_loss` is the same loss as a function.

    Args:
        thresholds: Strictly increasing probabilities inside (0, 1).
        gammas: One focusing parameter (each `>= 0`) more than `thresholds`.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = SampleDependentFocalLoss(from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.0210...

    Reference:
        - [Mukhoti et al., 2020. Calibrating Deep Neural Networks using Focal
          Loss. NeurIPS](https://arxiv.org/abs/2002.09437)
    """

    def __init__(
        self,
        thresholds=(0.2,),
        gammas=(5.0, 3.0),
        from_logits=False,
        reduction="sum_over_batch_size",
        name="sample_dependent_focal_loss",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.thresholds, self.gammas = check_sample_dependent_gammas(thresholds, gammas)

    def call(self, y_true, y_pred):
        return sample_dependent_focal_loss(
            y_true, y_pred, self.thresholds, self.gammas, self.from_logits
        )

    def get_config(self):
        return {
            **super().get_config(),
            "thresholds": list(self.thresholds),
            "gammas": list(self.gammas),
        }


@export
class DualFocalLoss(_ClassificationLoss):
    """Dual focal loss (Tao et al., 2023): `-(1 - p_y + p_j)^gamma log p_y`.

    `p_j` is the probability ranked right after the label's: the largest
    probability strictly below `p_y`, or 0 when there is none (the label ties
    with or trails every other class). As in the authors' code, `p_j` carries
    gradient. Ranks are compared on `y_pred` as given, so rounding in the
    softmax cannot make the label's own entry rank below itself. Vector labels
    give the observed class as their argmax. `dual_focal_loss` is the same
    loss as a function.

    The authors' code defaults to `gamma=0` (the cross-entropy) and their
    tuned values range from 2.3 to 6.1 by data set and model; the default
    here, 4, lies in the middle of that range.

    Args:
        gamma: Focusing parameter, `>= 0`.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = DualFocalLoss(gamma=4.0, from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.0450...

    Reference:
        - [Tao et al., 2023. Dual Focal Loss for Calibration.
          ICML](https://arxiv.org/abs/2305.13665)
    """

    def __init__(
        self,
        gamma=4.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="dual_focal_loss",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.gamma = check_non_negative("gamma", gamma)

    def call(self, y_true, y_pred):
        return dual_focal_loss(y_true, y_pred, self.gamma, self.from_logits)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma}


@export
class MarginLabelSmoothing(_ClassificationLoss):
    """Margin-based label smoothing, MbLS (Liu et al., 2022).

    `CE + weight * mean_k max(0, max_j z_j - z_k - margin)` on the logits `z`:
    the cross-entropy plus a penalty on logits more than `margin` below the
    largest one, averaged over the classes as in the authors' code. The
    penalty is defined on logits, so `from_logits` defaults to `True` and
    `False` is an error. Probability labels give the soft cross-entropy.
    `margin_label_smoothing` is the same loss as a function.

    Args:
        margin: Logit distance to the largest logit above which a class is
            penalised, `>= 0`.
        weight: Weight of the margin penalty, `>= 0`.
        from_logits: Must be `True`.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = MarginLabelSmoothing(margin=10.0, weight=0.1)
    >>> float(loss([0, 1], [[12.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.3423...

    Reference:
        - [Liu et al., 2022. The Devil is in the Margin: Margin-based Label
          Smoothing for Network Calibration. CVPR](https://arxiv.org/abs/2111.15430)
    """

    def __init__(
        self,
        margin=10.0,
        weight=0.1,
        from_logits=True,
        reduction="sum_over_batch_size",
        name="margin_label_smoothing",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        _check_margin_from_logits(self.from_logits)
        self.margin = check_non_negative("margin", margin)
        self.weight = check_non_negative("weight", weight)

    def call(self, y_true, y_pred):
        return margin_label_smoothing(y_true, y_pred, self.margin, self.weight)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "weight": self.weight}


@export
class PolyLoss(_ClassificationLoss):
    """Poly-1 loss (Leng et al., 2022): `CE + epsilon * (1 - p_y)`.

    The cross-entropy with the coefficient of its first polynomial term,
    `(1 - p_y)`, raised by `epsilon`. `epsilon >= -1` keeps the loss
    decreasing in `p_y`. Probability labels give
    `CE(y, p) + epsilon * (1 - sum_k y_k p_k)`, as in the authors' code.
    `poly_loss` is the same loss as a function.

    Args:
        epsilon: Coefficient added to the first polynomial term, `>= -1`.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Type of reduction to apply to the loss: `"sum"`,
            `"sum_over_batch_size"`, `"mean"`, `"mean_with_sample_weight"`, or
            `None` / `"none"` for per-sample losses.
        name: Name of the loss instance.
        dtype: The dtype of the loss's result. Defaults to
            `keras.backend.floatx()`. float16 and bfloat16 inputs are computed
            in float32.

    Example:

    >>> loss = PolyLoss(epsilon=1.0, from_logits=True)
    >>> float(loss([0, 1], [[4.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    0.5233...

    Reference:
        - [Leng et al., 2022. PolyLoss: A Polynomial Expansion Perspective of
          Classification Loss Functions. ICLR](https://arxiv.org/abs/2204.12511)
    """

    def __init__(
        self,
        epsilon=1.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="poly_loss",
        dtype=None,
    ):
        super().__init__(from_logits, reduction, name, dtype)
        self.epsilon = _check_epsilon("epsilon", epsilon)

    def call(self, y_true, y_pred):
        return poly_loss(y_true, y_pred, self.epsilon, self.from_logits)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def _piecewise_gamma(log_p, thresholds, gammas):
    """`gammas[i]` where `thresholds[i - 1] <= p < thresholds[i]`, no gradient."""
    log_p = ops.stop_gradient(log_p)
    gamma = ops.zeros_like(log_p) + _as_float(gammas[0], log_p.dtype)
    for index in range(len(gammas) - 1):
        threshold = thresholds[index]
        if _is_tensor(threshold):
            log_threshold = ops.log(ops.cast(threshold, log_p.dtype))
        else:
            log_threshold = math.log(threshold)
        next_gamma = _as_float(gammas[index + 1], log_p.dtype)
        gamma = ops.where(log_p >= log_threshold, next_gamma, gamma)
    return gamma


def _as_float(value, dtype):
    return ops.cast(value, dtype) if _is_tensor(value) else value


def _check_margin_from_logits(from_logits):
    if from_logits is not True:
        raise ValueError(
            "`MarginLabelSmoothing` penalises logit distances, which "
            "probabilities do not determine: it needs `from_logits=True`. "
            f"Received: from_logits={from_logits!r}"
        )


def _check_epsilon(name, value):
    return check_at_least(name, value, -1.0, " (the loss must not increase with p_y)")


# Building blocks.


def log_probabilities(y_pred, from_logits):
    """Log-probabilities over the last axis from logits or probabilities."""
    if from_logits:
        return ops.log_softmax(y_pred, axis=-1)
    probabilities = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
    epsilon = keras.config.epsilon()
    return ops.log(_clip(probabilities, epsilon, 1.0 - epsilon))


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
    shifted, exp_shifted, normaliser = _shifted_exponentials(logits)
    log_normaliser = ops.log(normaliser)
    mean_shifted = ops.sum(exp_shifted * shifted, axis=-1) / normaliser
    return shifted, log_normaliser, log_normaliser - mean_shifted


def _shifted_exponentials(logits):
    """`z - max z` (the maximum a constant to the gradient), its exponentials
    and their sum over classes."""
    shifted = logits - ops.stop_gradient(ops.max(logits, axis=-1, keepdims=True))
    exp_shifted = ops.exp(shifted)
    return shifted, exp_shifted, ops.sum(exp_shifted, axis=-1)


def _single_exp_softmax_is_faster(from_logits):
    # Measured with benchmarks/perf_losses.py: about 4x faster than the
    # log_softmax form on JAX and 1.4x on TensorFlow, but 3x slower under
    # torch.compile, whose fused log_softmax kernel wins there.
    return from_logits and keras.backend.backend() != "torch"


def entropy(log_p):
    """Shannon entropy of the distributions given by their log-probabilities."""
    return -ops.sum(ops.exp(log_p) * log_p, axis=-1)


def one_minus_probability(log_p):
    """`1 - exp(log_p)`, accurate near `log_p = 0` and never below ~1e-30.

    The argument is capped just below 0, so that `log_p == 0` (p rounds to 1)
    gives a tiny positive value with a finite gradient instead of 0.
    """
    return -ops.expm1(_at_most(log_p, _MAX_LOG_PROBABILITY))


def log1m_exp(log_p):
    """`log(1 - exp(log_p))` for `log_p <= 0`, finite at `log_p = 0`.

    Accurate to the rounding of `1 - p`: near `p = 1` through `expm1`, and for
    small `p`, where the result is about `-p`, to an absolute error of one
    rounding of 1, which is all any loss here adds it to.
    """
    return ops.log(one_minus_probability(log_p))


def focal_weight(log_p, gamma):
    """`(1 - p)^gamma` from `log p`; finite, with a finite gradient, at `p = 1`."""
    if not _is_tensor(gamma) and gamma == 0.0:
        return ops.ones_like(log_p)
    return _power(one_minus_probability(log_p), gamma)


def _power(x, exponent):
    # `x ** exponent` rather than `ops.power`, which on PyTorch makes a
    # Python exponent a tensor: measured 2.2x slower focal loss under
    # `torch.compile` at K = 1000.
    return x**exponent


def relaxation_from_log_probability(log_p, alpha):
    """The two-point label relaxation loss as a function of `log p_y`."""
    if _is_tensor(alpha):
        log_inside = ops.log1p(-alpha)
        # alpha * log(alpha), 0 at alpha = 0 in value and gradient.
        positive = ops.where(alpha > 0.0, alpha, ops.ones_like(alpha))
        alpha_log_alpha = alpha * ops.log(positive)
    elif alpha == 0.0:
        return -log_p
    else:
        log_inside, alpha_log_alpha = math.log1p(-alpha), alpha * math.log(alpha)
    constant = (1.0 - alpha) * log_inside + alpha_log_alpha
    kl = constant - (1.0 - alpha) * log_p - alpha * log1m_exp(log_p)
    # `kl` and its gradient are finite everywhere (see `log1m_exp`), so the
    # masked branch cannot leak a NaN into the gradient.
    return ops.where(log_p >= log_inside, ops.zeros_like(kl), kl)


def _has_fused_label_smoothing(alpha):
    # PyTorch's cross-entropy kernel smooths labels itself: measured 1.4x of
    # a cross-entropy on eager PyTorch at K = 1000, against 2.3x for the
    # gather-and-mean form below.
    return keras.backend.backend() == "torch" and not _is_tensor(alpha)


def _torch_fused_label_smoothing(y_true, logits, alpha):
    import torch

    class_ids = ops.cast(_labels.class_ids(y_true, logits), "int64")
    if len(logits.shape) > 2:  # classes on axis 1, as the kernel expects
        logits = torch.movedim(logits, -1, 1)
    return torch.nn.functional.cross_entropy(
        logits, class_ids, reduction="none", label_smoothing=alpha
    )


# Dispatch.


def _run_loss(name, y_true, y_pred, from_logits, *hyper_parameters):
    """Per-sample losses of the loss `name` on the fastest path that applies."""
    if _torch_kernel_applies(y_true, y_pred, from_logits, *hyper_parameters):
        return _torch_loss(name, y_true, y_pred, *hyper_parameters)
    if _compiled_call_applies(hyper_parameters) and not _fused_op_by_op_applies(
        name, y_true, y_pred, from_logits
    ):
        # The probability clip's epsilon is read when the function is traced.
        epsilon = keras.config.epsilon()
        compiled = _compiled_loss(name, from_logits, epsilon, *hyper_parameters)
        return compiled(y_true, y_pred)
    return _LOSS_BODIES[name](y_true, y_pred, from_logits, *hyper_parameters)


# Eager TensorFlow and JAX: one compiled call.
#
# Run op by op, a loss pays a dispatch for each of its tens of ops, both
# forward and in its recorded backward: several times the cost of the
# backends' one fused cross-entropy op at 10 classes. With Python-number
# hyper-parameters, an eager call on TensorFlow, and every call on JAX (where
# `jax.grad` traces without compiling, and a `jax.jit` inside a `jax.jit` is
# inlined), runs the loss as one compiled function instead, cached per loss
# and hyper-parameters so that new loss instances reuse it. Tapes and
# `jax.grad` differentiate through it. Measured with benchmarks/perf_losses.py
# under load: eager TensorFlow at K = 10 from 1.9x-7.5x of the cross-entropy
# to 0.5x-1.4x, eager JAX from 1.6x-2.4x to 0.6x-0.9x.


def _compiled_call_applies(hyper_parameters):
    backend = keras.backend.backend()
    if backend not in ("jax", "tensorflow"):
        return False
    if not all(_is_static(value) for value in hyper_parameters):
        return False
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    return True


# On TensorFlow the losses of `log p_y` run on its fused cross-entropy op
# (see `_function_of_log_p_kernel`). On large logits that op, run eagerly,
# beats one XLA call of the whole loss, which writes its (N, K) arrays afresh:
# label relaxation at 1024 x 32768 took 1.17x of Keras' cross-entropy
# compiled and 0.99x op by op, where at 4096 x 1000 XLA's 0.65x beats op by
# op's 1.2x (CPU time, under load; at 2048 x 8192 both about 1.1x).
_FUSED_CROSS_ENTROPY_LOSSES = (
    "label_relaxation",
    "focal_loss",
    "sample_dependent_focal_loss",
    "poly_loss",
)
_OP_BY_OP_FROM_ENTRIES = 2**24


def _fused_op_by_op_applies(name, y_true, y_pred, from_logits):
    if keras.backend.backend() != "tensorflow" or not from_logits:
        return False
    if name not in _FUSED_CROSS_ENTROPY_LOSSES or None in y_pred.shape:
        return False
    return math.prod(y_pred.shape) >= _OP_BY_OP_FROM_ENTRIES and _is_sparse(
        y_true, y_pred
    )


def _is_static(value):
    if isinstance(value, tuple):
        return all(_is_static(entry) for entry in value)
    return isinstance(value, numbers.Number)


@functools.cache
def _compiled_loss(name, from_logits, epsilon, *hyper_parameters):
    """`(y_true, y_pred) -> losses` of the loss `name`, compiled once.

    `epsilon`, `keras.config.epsilon()` at the call, only keys the cache.
    """
    del epsilon
    body = _LOSS_BODIES[name]

    def losses(y_true, y_pred):
        return body(y_true, y_pred, from_logits, *hyper_parameters)

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(losses)
    import tensorflow as tf

    # One trace per shape: XLA compiles per shape anyway, and a relaxed shape
    # would hide the labels' rank, which tells class ids from class vectors.
    return tf.function(losses, jit_compile=True, autograph=False)


# TensorFlow and JAX: gradients written out.
#
# XLA:CPU compiles the K-wide passes dual focal loss and MbLS add to a
# cross-entropy, and the masks of their autodiff gradients, into fusions that
# write several (N, K) temporaries: measured 5x (dual focal) and 9x (MbLS) of
# Keras' sparse cross-entropy at K = 1000 under `jax.jit`; the losses of
# `log p_y` alone fare better, but not well (see
# `_function_of_log_p_kernel`). The kernels below take logits
# (N, K), class ids (N,) and Python-number hyper-parameters and return the
# losses (N, 1) and `backward(g)`, which turns the upstream gradient (N, 1)
# into the gradient with respect to the logits in one elementwise pass.


def _logit_kernel_applies(y_true, y_pred, from_logits, *hyper_parameters):
    return (
        keras.backend.backend() in ("jax", "tensorflow")
        and from_logits
        and y_pred.shape[-1] is not None
        and all(_is_static(value) for value in hyper_parameters)
        and _is_sparse(y_true, y_pred)
    )


def _run_logit_kernel(kernel, y_true, logits, *hyper_parameters):
    """Per-sample losses of `kernel` with its own gradient."""
    class_ids = ops.reshape(_labels.class_ids(y_true, logits), (-1,))
    num_classes = logits.shape[-1]

    # The class ids are an argument, not a closure: JAX's custom gradients
    # cannot close over traced values.
    @ops.custom_gradient
    def losses(logits, class_ids):
        flat = ops.reshape(logits, (-1, num_classes))
        values, backward = kernel(flat, class_ids, *hyper_parameters)

        def gradient(*args, upstream=None):
            if upstream is None:  # JAX passes it positionally
                (upstream,) = args
            flat_gradient = backward(ops.reshape(upstream, (-1, 1)))
            return ops.reshape(flat_gradient, ops.shape(logits)), None

        return ops.reshape(values, ops.shape(logits)[:-1]), gradient

    return losses(logits, class_ids)


def _row_sum(x):
    """`sum(x, axis=-1, keepdims=True)` for (N, K) `x`, as one matrix product.

    XLA:CPU fuses row sums with their neighbours into slow loops at K in the
    thousands; a product with a vector of ones is one BLAS call (measured
    under `jax.jit`, MbLS at K = 1000: 3.6x of the cross-entropy -> 1.2x).
    """
    return ops.matmul(x, ops.ones((x.shape[-1], 1), dtype=x.dtype))


def _one_hot_rows(class_ids, z):
    """(N, K) one-hot of `class_ids` (N,) in the dtype of `z` (N, K)."""
    classes = ops.arange(z.shape[-1], dtype="int32")
    hits = ops.expand_dims(ops.cast(class_ids, "int32"), -1) == classes
    return ops.cast(hits, z.dtype)


def _first_in_rows(mask, z):
    """(N, K) one-hot of the first `True` in each row of `mask`, as `z`'s dtype."""
    return _one_hot_rows(ops.argmax(ops.cast(mask, "int32"), axis=-1), z)


def _shifted_logits(z):
    """`z - max z` and the log of its softmax normaliser, both per row.

    `log softmax(z) = shifted - log_sum`, accurate for logits of any size.
    """
    shifted = z - ops.max(z, axis=-1, keepdims=True)
    return shifted, ops.log(_row_sum(ops.exp(shifted)))


def _dual_focal_kernel(z, class_ids, gamma):
    shifted, log_sum = _shifted_logits(z)
    shifted_y = ops.expand_dims(take_class(shifted, class_ids), -1)
    log_p = shifted_y - log_sum
    # p_j: the largest probability strictly below p_y, ranked on the logits.
    below = shifted < shifted_y
    shifted_j = ops.max(ops.where(below, shifted, _LOWEST), axis=-1, keepdims=True)
    p_j = ops.where(shifted_j > _LOWEST, ops.exp(shifted_j - log_sum), 0.0)
    base = one_minus_probability(log_p) + p_j
    weight = _power(base, gamma)
    # L = -u^g l with u = (1 - p_y) + p_j and l = log p_y: dL = -u^g dl + b du
    # with b = -g u^(g - 1) l, dl = onehot_y - p and
    # du = -p_y (onehot_y - p) + p_j (onehot_j - p), where 1 - p_y is constant
    # past its cap (see `one_minus_probability`).
    b = -gamma * weight / base * log_p
    live = ops.cast(log_p <= _MAX_LOG_PROBABILITY, z.dtype)
    at_y = -weight - b * live * ops.exp(log_p)
    at_j = b * p_j

    def backward(g):
        p = ops.exp(shifted - log_sum)
        at_j_class = _first_in_rows(ops.logical_and(shifted == shifted_j, below), z)
        at_classes = at_y * _one_hot_rows(class_ids, z) + at_j * at_j_class
        return g * (at_classes - (at_y + at_j) * p)

    return -weight * log_p, backward


def _function_of_log_p_kernel(value_and_slope):
    """A logit kernel for a loss `f(log p_y)`: gradient `f'(log p_y) (onehot_y - p)`.

    `value_and_slope(log_p, *hyper_parameters)` gives `f` and `f'` on (N, 1).
    Autodiff leaves XLA to fuse these per-sample terms into the (N, K)
    gradient, which it does by recomputing them for every class: measured
    under `jax.jit`, under load, FLSD-53 at K = 10 from 1.56x of the
    cross-entropy to 0.88x, label relaxation at K = 1000 from 1.10x to 0.75x.
    On TensorFlow, its fused cross-entropy op gives `-log p_y` and
    `p - onehot_y` in one pass over the logits, which XLA compiles too.
    """

    def kernel(z, class_ids, *hyper_parameters):
        if keras.backend.backend() == "tensorflow":
            return tensorflow_kernel(z, class_ids, *hyper_parameters)
        shifted, log_sum = _shifted_logits(z)
        log_p = ops.expand_dims(take_class(shifted, class_ids), -1) - log_sum
        losses, slope = value_and_slope(log_p, *hyper_parameters)

        def backward(g):
            p = ops.exp(shifted - log_sum)
            return (g * slope) * (_one_hot_rows(class_ids, z) - p)

        return losses, backward

    def tensorflow_kernel(z, class_ids, *hyper_parameters):
        import tensorflow as tf

        cross_entropy, residual = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=z, labels=class_ids
        )
        log_p = -ops.expand_dims(cross_entropy, -1)
        losses, slope = value_and_slope(log_p, *hyper_parameters)
        return losses, lambda g: (-g * slope) * residual

    return kernel


def _odds(log_p):
    """`p / (1 - p)`, the slope of `-log1m_exp`; 0 past its cap."""
    live = log_p <= _MAX_LOG_PROBABILITY
    return ops.where(live, ops.exp(log_p) / one_minus_probability(log_p), 0.0)


def _relaxation_value_and_slope(log_p, alpha):
    losses = relaxation_from_log_probability(log_p, alpha)
    if alpha == 0.0:
        return losses, ops.full_like(log_p, -1.0)
    # d/dl [c - (1 - a) l - a log(1 - e^l)], 0 where the loss is.
    slope = alpha * _odds(log_p) - (1.0 - alpha)
    return losses, ops.where(log_p >= math.log1p(-alpha), 0.0, slope)


def _focal_value_and_slope(log_p, gamma):
    weight = focal_weight(log_p, gamma)
    # d/dl [-(1 - p)^g l] = g (1 - p)^g (p / (1 - p)) l - (1 - p)^g.
    slope = gamma * weight * _odds(log_p) * log_p - weight
    return -weight * log_p, slope


def _sample_dependent_focal_value_and_slope(log_p, thresholds, gammas):
    return _focal_value_and_slope(log_p, _piecewise_gamma(log_p, thresholds, gammas))


def _poly_value_and_slope(log_p, epsilon):
    # d/dl [-l - e (e^l - 1)] = -1 - e p.
    return -log_p - epsilon * ops.expm1(log_p), -1.0 - epsilon * ops.exp(log_p)


_RELAXATION_KERNEL = _function_of_log_p_kernel(_relaxation_value_and_slope)
_FOCAL_KERNEL = _function_of_log_p_kernel(_focal_value_and_slope)
_SAMPLE_DEPENDENT_FOCAL_KERNEL = _function_of_log_p_kernel(
    _sample_dependent_focal_value_and_slope
)
_POLY_KERNEL = _function_of_log_p_kernel(_poly_value_and_slope)


def _margin_kernel(z, class_ids, margin, weight):
    shifted, log_sum = _shifted_logits(z)
    # CE + (w / K) sum_k relu(max z - m - z_k): the gradient is p - onehot_y,
    # -w / K at the classes below the ceiling max z - m and w / K times their
    # count at the (first) largest logit.
    # A `where` rather than `relu`: XLA:CPU fuses the latter with the row sums
    # below into loops 2-3x slower (measured at K = 1000 under `jax.jit`).
    below = shifted < -margin
    gaps = ops.where(below, -margin - shifted, 0.0)
    rate = weight / z.shape[-1]
    cross_entropy = log_sum - ops.expand_dims(take_class(shifted, class_ids), -1)
    count = _row_sum(ops.sign(gaps))

    def backward(g):
        p = ops.exp(shifted - log_sum)
        at_top = _first_in_rows(shifted == 0.0, z)
        at_classes = count * at_top - ops.cast(below, z.dtype)
        gradient = p - _one_hot_rows(class_ids, z) + rate * at_classes
        return g * gradient

    return cross_entropy + rate * _row_sum(gaps), backward


# PyTorch: gradients written out.
#
# Eager PyTorch (what `fit` runs there by default) pays for every op twice:
# once forward and once more for its recorded backward. On integer labels,
# logits and Python-number hyper-parameters, the losses below record nothing
# forward and compute their gradient with respect to the logits in one or
# two passes over the classes, as PyTorch's own cross-entropy kernel does.
# `torch.compile` traces them too (forward and backward): its fusions of the
# generic forms' autodiff gradients cost up to 1.8x of the cross-entropy
# where these kernels cost about 1x (measured under load, see
# benchmarks/perf_losses.py).


def _torch_kernel_applies(y_true, y_pred, from_logits, *hyper_parameters):
    if keras.backend.backend() != "torch" or not from_logits:
        return False
    if any(_is_tensor(value) for value in hyper_parameters):
        return False
    return _is_sparse(y_true, y_pred)


def _torch_loss(kernel, y_true, logits, *hyper_parameters):
    """Per-sample losses of `kernel`, a key of `_TORCH_KERNELS`."""
    class_ids = _labels.class_ids(y_true, logits)
    return _SPARSE_LOGIT_LOSS.apply(logits, class_ids, kernel, *hyper_parameters)


def _sparse_logit_loss_function():
    """The autograd Function that runs a kernel of `_TORCH_KERNELS`.

    A kernel takes the logits `z` (N, K), the class ids `y` (N, 1) and the
    hyper-parameters, and returns the losses (N, 1) and `backward(g)`, which
    turns the upstream gradient `g` (N, 1) into the gradient with respect to
    `z`, a new tensor: the forward's tensors stay as they are, so that a
    second backward gives the same.
    """
    import torch

    class SparseLogitLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, class_ids, kernel, *hyper_parameters):
            z = logits.reshape(-1, logits.shape[-1])
            y = class_ids.reshape(-1, 1).long()
            losses, backward = _TORCH_KERNELS[kernel](z, y, *hyper_parameters)
            ctx.backward = backward
            ctx.num_inputs = 3 + len(hyper_parameters)
            return losses.reshape(logits.shape[:-1])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, upstream):
            gradient = ctx.backward(upstream.reshape(-1, 1))
            gradient = gradient.reshape(*upstream.shape, gradient.shape[-1])
            return (gradient,) + (None,) * (ctx.num_inputs - 1)

    return SparseLogitLoss


class _TorchRows(typing.NamedTuple):
    """Logits `z` (N, K), class ids `y` (N, 1), `p = softmax(z)`, `log p_y`
    (N, 1), and either the log-probabilities (N, K) or the rows' largest
    logits `top` and log-normalisers `log_sum` (`log p = z - top - log_sum`)."""

    z: typing.Any
    y: typing.Any
    p: typing.Any
    log_p: typing.Any
    log_probabilities: typing.Any = None
    top: typing.Any = None
    log_sum: typing.Any = None


# From this many classes on, `_torch_rows` takes the log-normaliser from the
# softmax, whose largest entry is `1 / sum exp(z - top)`: one exponential
# pass, which the gradient needs anyway, instead of a log-softmax's as well
# (at K = 1000 each pass costs about a third of a cross-entropy's forward and
# backward). With fewer, the four more small ops that takes cost more than
# the pass: at K = 10 label relaxation took 1.6x of the cross-entropy that
# way against 1.3x from a log-softmax (CPU time, under load).
_SOFTMAX_FROM_CLASSES = 256


def _torch_rows(z, y, top=None):
    """`_TorchRows` of `z` and `y`, with `top` if the caller has it."""
    import torch

    if z.shape[-1] < _SOFTMAX_FROM_CLASSES:
        log_probabilities = torch.log_softmax(z, dim=-1)
        p = torch.exp(log_probabilities)
        return _TorchRows(z, y, p, log_probabilities.gather(1, y), log_probabilities)
    if top is None:
        top = z.amax(dim=-1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    log_sum = -torch.log(p.amax(dim=-1, keepdim=True))
    log_p = z.gather(1, y) - top - log_sum
    return _TorchRows(z, y, p, log_p, top=top, log_sum=log_sum)


def _function_of_log_p(value_and_slope):
    """A kernel for a loss `f(log p_y)`: gradient `f'(log p_y) (onehot_y - p)`."""

    def kernel(z, y, *hyper_parameters):
        rows = _torch_rows(z, y)
        losses, slope = value_and_slope(rows.log_p, *hyper_parameters)

        def backward(g):
            slope_g = slope * g
            return (rows.p * -slope_g).scatter_add_(1, rows.y, slope_g)

        return losses, backward

    return kernel


def _torch_one_minus_p(log_p):
    """`1 - p` as `one_minus_probability` computes it, and where its cap is off."""
    import torch

    capped = log_p.clamp(max=_MAX_LOG_PROBABILITY)
    return -torch.expm1(capped), log_p <= _MAX_LOG_PROBABILITY


def _torch_relaxation(log_p, alpha):
    import torch

    if alpha == 0.0:
        return -log_p, torch.full_like(log_p, -1.0)
    # Outside the credal set (log p < log(1 - a) < 0), 1 - p > 0 needs no cap,
    # and the slope a p / (1 - p) - (1 - a) is a / (1 - p) - 1. Inside, the
    # infinities where p rounds to 1 are filled with 0. Few ops on purpose:
    # at K = 10 each (N, 1) op costs about 1% of the cross-entropy.
    log_inside = math.log1p(-alpha)
    constant = (1.0 - alpha) * log_inside + alpha * math.log(alpha)
    inside = log_p >= log_inside
    rest = torch.expm1(log_p).neg_()
    losses = torch.rsub(log_p, constant, alpha=1.0 - alpha)
    losses.sub_(torch.log(rest), alpha=alpha).masked_fill_(inside, 0.0)
    slope = rest.reciprocal_().mul_(alpha).sub_(1.0).masked_fill_(inside, 0.0)
    return losses, slope


def _torch_focal(log_p, gamma):
    import torch

    if isinstance(gamma, numbers.Number) and gamma == 0.0:
        return -log_p, torch.full_like(log_p, -1.0)
    # d/dl [-(1 - p)^g l] = g p (1 - p)^(g - 1) l - (1 - p)^g. The cap keeps
    # 1 - p >= 1e-30, so the power stays finite; where it binds, l is within
    # 1e-30 of 0 and the first term vanishes with it.
    capped = log_p.clamp(max=_MAX_LOG_PROBABILITY)
    rest = torch.expm1(capped).neg_()
    power_below = torch.pow(rest, gamma - 1.0)
    weight = power_below * rest
    slope = torch.exp(capped).mul_(power_below).mul_(log_p).mul_(gamma)
    return torch.mul(weight, log_p).neg_(), slope.sub_(weight)


def _torch_sample_dependent_focal(log_p, thresholds, gammas):
    import torch

    gamma = torch.full_like(log_p, gammas[0])
    for threshold, next_gamma in zip(thresholds, gammas[1:], strict=True):
        gamma.masked_fill_(log_p >= math.log(threshold), next_gamma)
    return _torch_focal(log_p, gamma)


def _torch_poly(log_p, epsilon):
    import torch

    # d/dl [-l - e (p - 1)] = -1 - e p.
    losses = -log_p - epsilon * torch.expm1(log_p)
    return losses, -1.0 - epsilon * torch.exp(log_p)


def _torch_label_smoothing(z, y, alpha):
    import torch

    # CE + a (z_y - mean z); gradient p - (1 - a) onehot_y - a / K.
    rows = _torch_rows(z, y)
    spread = z.gather(1, y) - z.mean(dim=-1, keepdim=True)
    losses = alpha * spread - rows.log_p

    def backward(g):
        gradient = torch.addcmul(g * (-alpha / z.shape[-1]), rows.p, g)
        return gradient.scatter_add_(1, y, (alpha - 1.0) * g)

    return losses, backward


def _torch_confidence_penalty(z, y, beta):
    # CE - b H; gradient p (1 + b (log p + H)) - onehot_y. With
    # log p = shifted - log_sum and q = p shifted: H = log_sum - sum q, a sum
    # of two non-negative terms, and the gradient is p c + b g q - onehot_y g
    # for c = g (1 + b (H - log_sum)).
    rows = _torch_rows(z, y)
    product = _torch_probability_times_shifted(rows)
    log_sum = 0.0 if rows.log_sum is None else rows.log_sum
    entropy_ = log_sum - product.sum(dim=-1, keepdim=True)
    losses = -rows.log_p - beta * entropy_
    take_product = _torch_once_then(
        product, lambda: _torch_probability_times_shifted(rows)
    )

    def backward(g):
        gradient = (
            take_product()
            .mul_(g * beta)
            .addcmul_(rows.p, g * (1.0 + beta * (entropy_ - log_sum)))
        )
        return gradient.scatter_add_(1, y, -g)

    return losses, backward


def _torch_once_then(tensor, recompute):
    """A `take()` that returns `tensor` once, then new tensors `recompute()`.

    For a backward that turns a forward tensor into the gradient in place:
    each fresh (N, K) tensor costs page faults on top of its pass on eager
    PyTorch. A second backward, after `retain_graph=True`, recomputes it.
    """
    import torch

    if torch.compiler.is_compiling():
        # Traced, the compiler plans the memory and fuses the recomputation
        # into the gradient; the reuse's Python state would cost more (CP and
        # MbLS at 1.6-2.5x of the cross-entropy under `torch.compile`).
        return recompute
    spare = [tensor]
    return lambda: spare.pop() if spare else recompute()


def _torch_probability_times_shifted(rows):
    """A new tensor `p * (z - top)`, or `p * log p` on the log-softmax route."""
    import torch

    if rows.log_probabilities is None:
        return torch.sub(rows.z, rows.top).mul_(rows.p)
    return rows.log_probabilities.mul(rows.p)


def _torch_dual_focal(z, y, gamma):
    import torch

    rows = _torch_rows(z, y)
    log_p = rows.log_p
    # p_j = p_y exp(z_j - z_y), z_j the largest logit strictly below z_y,
    # ranked exactly on the bits of the gaps z - z_y: read as signed integers,
    # the negative floats come in reverse order below every float >= +0, so
    # the smallest is the largest negative gap (+0.0 turns -0.0 into +0.0).
    # Not a `where` and a max, which are 4-8x slower on eager PyTorch.
    z_y = z.gather(1, y)
    gaps = torch.sub(z, z_y).add_(0.0)
    gap_bits = gaps.view(_TORCH_SIGNED_BITS[z.element_size()])
    j = gap_bits.argmin(dim=-1, keepdim=True)
    bits = gap_bits.gather(1, j)
    p_j = torch.exp(z.gather(1, j) - z_y + log_p).masked_fill_(bits >= 0, 0.0)
    rest, live = _torch_one_minus_p(log_p)
    base = rest + p_j
    weight = torch.pow(base, gamma)
    # L = -u^g l with u = (1 - p_y) + p_j: dL = -u^g dl + b du with
    # b = -g u^(g - 1) l, dl = onehot_y - p and
    # du = -p_y (onehot_y - p) + p_j (onehot_j - p).
    b = -gamma * weight / base * log_p
    at_y = -weight - b * live * torch.exp(log_p)
    at_j = b * p_j

    def backward(g):
        gradient = rows.p * (-(at_y + at_j) * g)
        return gradient.scatter_add_(1, y, at_y * g).scatter_add_(1, j, at_j * g)

    return -weight * log_p, backward


def _torch_signed_bits():
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _torch_margin_label_smoothing(z, y, margin, weight):
    import torch

    # CE + (w / K) sum_k relu(max z - m - z_k); gradient p - onehot_y
    # - (w / K) [z_k below the ceiling] + (w / K) #below at the argmax.
    top = z.amax(dim=-1, keepdim=True)
    rows = _torch_rows(z, y, top)
    rate = weight / z.shape[-1]
    # The distances top - z are >= +0, and such floats order as their bits
    # do read as integers: an integer argmin finds the first largest logit in
    # under half the time of a float `max` with indices on eager PyTorch.
    distances = torch.sub(top, z)
    top_index = distances.view(_TORCH_SIGNED_BITS[z.element_size()]).argmin(
        dim=-1, keepdim=True
    )

    def gaps_below_ceiling(distances):
        return distances.sub_(margin).clamp_(min=0.0)

    gaps = gaps_below_ceiling(distances)
    losses = rate * gaps.sum(dim=-1, keepdim=True) - rows.log_p
    # 1 where a class is below the ceiling, else 0 (the gaps are >= 0).
    below = gaps.sign_()
    count = below.sum(dim=-1, keepdim=True)
    take_below = _torch_once_then(
        below, lambda: gaps_below_ceiling(torch.sub(top, z)).sign_()
    )

    def backward(g):
        gradient = take_below().mul_(-rate * g).addcmul_(rows.p, g)
        gradient.scatter_add_(1, y, -g)
        return gradient.scatter_add_(1, top_index, rate * g * count)

    return losses, backward


_TORCH_KERNELS = {
    "label_relaxation": _function_of_log_p(_torch_relaxation),
    "focal_loss": _function_of_log_p(_torch_focal),
    "sample_dependent_focal_loss": _function_of_log_p(_torch_sample_dependent_focal),
    "poly_loss": _function_of_log_p(_torch_poly),
    "label_smoothing": _torch_label_smoothing,
    "confidence_penalty": _torch_confidence_penalty,
    "dual_focal_loss": _torch_dual_focal,
    "margin_label_smoothing": _torch_margin_label_smoothing,
}


# Made once at import: `torch.compile` cannot trace a class definition, so
# the Function must exist before any compiled call reaches `_torch_loss`.
_SPARSE_LOGIT_LOSS = (
    _sparse_logit_loss_function() if keras.backend.backend() == "torch" else None
)
_TORCH_SIGNED_BITS = (
    _torch_signed_bits() if keras.backend.backend() == "torch" else None
)


_LOSS_BODIES = {
    "label_relaxation": _label_relaxation,
    "label_smoothing": _label_smoothing,
    "confidence_penalty": _confidence_penalty,
    "focal_loss": _focal_loss,
    "sample_dependent_focal_loss": _sample_dependent_focal_loss,
    "dual_focal_loss": _dual_focal_loss,
    "margin_label_smoothing": _margin_label_smoothing,
    "poly_loss": _poly_loss,
}


def _cross_entropy(y_true, y_pred, log_p, sparse):
    if sparse:
        return -take_class(log_p, _labels.class_ids(y_true, y_pred))
    return -ops.sum(_label_vectors(y_true, y_pred) * log_p, axis=-1)


def _prepare(y_true, y_pred):
    """Tensors, with `y_pred` in its compute dtype (float32 or float64)."""
    y_pred = ops.convert_to_tensor(y_pred)
    if not hasattr(y_pred, "ndim"):
        # A `tf.Variable`, which Keras' TensorFlow `take_along_axis` rejects.
        y_pred = y_pred.read_value()
    y_pred = ops.cast(y_pred, _compute_dtype(y_pred))
    return ops.convert_to_tensor(y_true), y_pred


def _is_sparse(y_true, y_pred):
    return _labels.label_kind(y_true, y_pred) == _labels.SPARSE


def _label_vectors(y_true, y_pred):
    return ops.cast(y_true, y_pred.dtype)


def _is_tensor(value):
    return hasattr(value, "dtype") and not isinstance(value, numbers.Number)


def _hyper_parameter(name, value, check, dtype):
    """A checked Python float, or a tensor cast to `dtype`."""
    if _is_tensor(value):
        return ops.cast(value, dtype)
    return check(name, value)


def _nan_outside(losses, value, low, high=None):
    """NaN losses where a tensor hyper-parameter is outside `[low, high)`."""
    if not _is_tensor(value):
        return losses
    valid = value >= low
    if high is not None:
        valid = ops.logical_and(valid, value < high)
    return ops.where(valid, losses, ops.full_like(losses, float("nan")))


def _mean_over_classes(x):
    # Keras' `ops.mean` on JAX reduces float64 in float32.
    num_classes = x.shape[-1]
    if num_classes is None:
        num_classes = ops.cast(ops.shape(x)[-1], x.dtype)
    return ops.sum(x, axis=-1) / num_classes


def _at_most(x, bound):
    return _clip(x, _LOWEST, bound)


def _clip(x, low, high):
    # Bounds in x's dtype: on PyTorch, Keras makes Python bounds float32 tensors
    # (1 - 1e-7 becomes 0.99999988), and `ops.minimum` computes in float32.
    low = ops.convert_to_tensor(low, dtype=x.dtype)
    return ops.clip(x, low, ops.convert_to_tensor(high, dtype=x.dtype))


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
