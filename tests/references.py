"""Independent float64 references for the losses, in numpy and scipy.

These follow the papers' definitions directly (the K-wide KL for label
relaxation, the smoothed target for label smoothing, ...) rather than the
package's closed forms. Probabilities follow the documented convention:
normalised, then clipped to [1e-7, 1 - 1e-7] before the logarithm.
"""

import numpy as np
from scipy import special

EPSILON = 1e-7


def log_probabilities(y_pred, from_logits):
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if from_logits:
        return special.log_softmax(y_pred, axis=-1)
    probabilities = y_pred / y_pred.sum(axis=-1, keepdims=True)
    return np.log(np.clip(probabilities, EPSILON, 1.0 - EPSILON))


def label_vectors(y_true, num_classes):
    """One-hot vectors from ids, vectors passed through, as float64."""
    y_true = np.asarray(y_true)
    if np.issubdtype(y_true.dtype, np.integer):
        return np.eye(num_classes)[y_true]
    return y_true.astype(np.float64)


def cross_entropy(targets, log_p):
    return -np.sum(targets * log_p, axis=-1)


def label_smoothing(y_true, y_pred, alpha, from_logits):
    log_p = log_probabilities(y_pred, from_logits)
    num_classes = log_p.shape[-1]
    targets = (1 - alpha) * label_vectors(y_true, num_classes) + alpha / num_classes
    return cross_entropy(targets, log_p)


def confidence_penalty(y_true, y_pred, beta, from_logits):
    log_p = log_probabilities(y_pred, from_logits)
    targets = label_vectors(y_true, log_p.shape[-1])
    entropy = -np.sum(special.xlogy(np.exp(log_p), np.exp(log_p)), axis=-1)
    return cross_entropy(targets, log_p) - beta * entropy


def focal_loss(y_true, y_pred, gamma, from_logits):
    log_p = log_probabilities(y_pred, from_logits)
    targets = label_vectors(y_true, log_p.shape[-1])
    weights = (1.0 - np.exp(log_p)) ** gamma
    return -np.sum(targets * weights * log_p, axis=-1)


def relaxed_target(observed, probabilities, alpha):
    """The projection q of eq. (6): q_y = 1 - alpha, the rest rescaled to alpha."""
    one_hot = np.eye(probabilities.shape[-1], dtype=bool)[observed]
    rest = np.where(one_hot, 0.0, probabilities)
    with np.errstate(invalid="ignore", divide="ignore"):  # p_y = 1: no rest
        rest = alpha * rest / rest.sum(axis=-1, keepdims=True)
    return np.where(one_hot, 1.0 - alpha, rest)


def label_relaxation(y_true, y_pred, alpha, from_logits):
    """Eq. (5): 0 inside the credal set, else the K-wide KL(q || p)."""
    log_p = log_probabilities(y_pred, from_logits)
    probabilities = np.exp(log_p)
    observed = np.argmax(label_vectors(y_true, log_p.shape[-1]), axis=-1)
    p_observed = np.take_along_axis(probabilities, observed[..., None], -1)[..., 0]
    q = relaxed_target(observed, probabilities, alpha)
    kl = np.sum(special.xlogy(q, q) - q * log_p, axis=-1)
    return np.where(p_observed >= 1.0 - alpha, 0.0, kl)


def reduce(losses, sample_weight, reduction):
    losses = np.asarray(losses, dtype=np.float64)
    if sample_weight is not None:
        losses = losses * np.asarray(sample_weight, dtype=np.float64)
    if reduction in (None, "none"):
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and sample_weight is not None:
        return total / np.sum(sample_weight)
    return total / losses.size


def numeric_gradient(fn, x, step=1e-6):
    """Central differences of a scalar function of a float64 array."""
    x = np.asarray(x, dtype=np.float64)
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        shift = np.zeros_like(x)
        shift[index] = step
        gradient[index] = (fn(x + shift) - fn(x - shift)) / (2 * step)
    return gradient


def observed_probability(targets, probabilities):
    observed = np.argmax(targets, axis=-1)
    return observed, np.take_along_axis(probabilities, observed[..., None], -1)[..., 0]


def sample_dependent_focal_loss(y_true, y_pred, thresholds, gammas, from_logits):
    """Mukhoti et al.: gamma per class entry from its probability's bin."""
    log_p = log_probabilities(y_pred, from_logits)
    probabilities = np.exp(log_p)
    targets = label_vectors(y_true, log_p.shape[-1])
    bins = np.searchsorted(np.asarray(thresholds), probabilities, side="right")
    weights = (1.0 - probabilities) ** np.asarray(gammas)[bins]
    return -np.sum(targets * weights * log_p, axis=-1)


def dual_focal_loss(y_true, y_pred, gamma, from_logits):
    """Tao et al.: p_j is the largest probability strictly below p_y, else 0."""
    log_p = log_probabilities(y_pred, from_logits)
    probabilities = np.exp(log_p)
    targets = label_vectors(y_true, log_p.shape[-1])
    observed, p_observed = observed_probability(targets, probabilities)
    below = probabilities < p_observed[..., None]
    p_next = np.max(np.where(below, probabilities, 0.0), axis=-1)
    log_p_observed = np.take_along_axis(log_p, observed[..., None], -1)[..., 0]
    return -((1.0 - p_observed + p_next) ** gamma) * log_p_observed


def margin_label_smoothing(y_true, y_pred, margin, weight, from_logits=True):
    """Liu et al.: CE + weight * mean over classes of the hinge on logit gaps."""
    assert from_logits
    logits = np.asarray(y_pred, dtype=np.float64)
    log_p = special.log_softmax(logits, axis=-1)
    targets = label_vectors(y_true, log_p.shape[-1])
    gaps = logits.max(axis=-1, keepdims=True) - logits
    penalty = np.mean(np.maximum(0.0, gaps - margin), axis=-1)
    return cross_entropy(targets, log_p) + weight * penalty


def poly_loss(y_true, y_pred, epsilon, from_logits):
    """Leng et al., Poly-1: CE + epsilon * (1 - p_t), p_t = sum_k y_k p_k."""
    log_p = log_probabilities(y_pred, from_logits)
    targets = label_vectors(y_true, log_p.shape[-1])
    p_target = np.sum(targets * np.exp(log_p), axis=-1)
    return cross_entropy(targets, log_p) + epsilon * (1.0 - p_target)
