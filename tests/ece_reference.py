"""Float64 numpy reference for the top-label calibration error.

Written independently of the package: a direct loop over bins `(lo, hi]`
(a confidence of 1.0 in the last bin, 0.0 in the first), in float64.
"""

import numpy as np


def softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def bin_statistics(labels, probs, num_bins=15, sample_weight=None):
    """Per-bin total weight, weighted confidence sum and correct sum."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    weight = np.ones(len(labels))
    if sample_weight is not None:
        weight = np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1), weight.shape
        )
    confidence = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    weights, confidences, corrects = (np.zeros(num_bins) for _ in range(3))
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        members = (confidence > lo) & (confidence <= hi)
        if b == 0:
            members |= confidence == 0.0
        weights[b] = weight[members].sum()
        confidences[b] = (weight * confidence)[members].sum()
        corrects[b] = (weight * correct)[members].sum()
    return weights, confidences, corrects


def calibration_error(labels, probs, num_bins=15, norm="l1", sample_weight=None):
    weights, confidences, corrects = bin_statistics(
        labels, probs, num_bins, sample_weight
    )
    total = weights.sum()
    if total == 0:
        return 0.0
    gaps = np.abs(corrects - confidences)
    nonempty = weights > 0
    if norm == "l1":
        return float(gaps.sum() / total)
    if norm == "l2":
        return float(np.sqrt((gaps[nonempty] ** 2 / weights[nonempty]).sum() / total))
    if norm == "max":
        return float((gaps[nonempty] / weights[nonempty]).max())
    raise ValueError(norm)


def protocol_check_data(num_samples=10**6, num_classes=10, seed=0):
    """Data with a known float64 ECE (0.56067 for 10 classes, 15 bins).

    Logits are 3 * N(0, 1) and labels uniform, drawn from
    `np.random.default_rng(seed)` in that order.
    """
    rng = np.random.default_rng(seed)
    logits = 3.0 * rng.standard_normal((num_samples, num_classes))
    labels = rng.integers(0, num_classes, num_samples)
    return logits, labels


def top_label(labels, probs, sample_weight=None):
    """Flat float64 confidences, correctness and weights."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    weight = np.ones(len(labels))
    if sample_weight is not None:
        weight = np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1), weight.shape
        )
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    return probs.max(axis=-1), correct, np.asarray(weight, np.float64)


def equal_mass_bin_statistics(labels, probs, num_bins=15, sample_weight=None):
    """Exact equal-mass bins: per-bin weight, confidence sum and correct sum.

    Predictions sorted by confidence are laid end to end by weight and cut
    into `num_bins` pieces of equal weight. Predictions of equal confidence
    form one block; a block cut by an edge is split in proportion to the
    weight on each side. Written as the overlap of each block's weight
    interval with each bin's.
    """
    confidence, correct, weight = top_label(labels, probs, sample_weight)
    values, block = np.unique(confidence, return_inverse=True)
    block_weight = np.bincount(block, weight, len(values))
    block_confidence = np.bincount(block, weight * confidence, len(values))
    block_correct = np.bincount(block, weight * correct, len(values))
    ends = np.cumsum(block_weight)
    starts = ends - block_weight
    total = ends[-1] if len(ends) else 0.0
    weights, confidences, corrects = (np.zeros(num_bins) for _ in range(3))
    for b in range(num_bins):
        lo, hi = total * b / num_bins, total * (b + 1) / num_bins
        overlap = np.clip(np.minimum(ends, hi) - np.maximum(starts, lo), 0.0, None)
        share = np.divide(
            overlap, block_weight, out=np.zeros_like(overlap), where=block_weight > 0
        )
        weights[b] = overlap.sum()
        confidences[b] = (share * block_confidence).sum()
        corrects[b] = (share * block_correct).sum()
    return weights, confidences, corrects


def binned_error(weights, confidences, corrects, norm="l1"):
    """The binned calibration error of per-bin sums (bins on the last axis)."""
    total = weights.sum()
    if total == 0:
        return 0.0
    gaps = np.abs(corrects - confidences)
    nonempty = weights > 0
    if norm == "l1":
        return float(gaps.sum() / total)
    if norm == "l2":
        return float(np.sqrt((gaps[nonempty] ** 2 / weights[nonempty]).sum() / total))
    if norm == "max":
        return float((gaps[nonempty] / weights[nonempty]).max())
    raise ValueError(norm)


def equal_mass_calibration_error(
    labels, probs, num_bins=15, norm="l1", sample_weight=None
):
    stats = equal_mass_bin_statistics(labels, probs, num_bins, sample_weight)
    return binned_error(*stats, norm)


def classwise_calibration_error(
    labels, probs, num_bins=15, norm="l1", sample_weight=None
):
    """Mean over all classes of the equal-width `(lo, hi]` binned error of
    `p_k` against `[y == k]` (Kull et al., 2019)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    weight = np.ones(len(labels))
    if sample_weight is not None:
        weight = np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1), weight.shape
        )
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    errors = []
    for k in range(probs.shape[1]):
        p = probs[:, k]
        hit = (labels == k).astype(np.float64)
        weights, confidences, corrects = (np.zeros(num_bins) for _ in range(3))
        for b in range(num_bins):
            members = (p > edges[b]) & (p <= edges[b + 1])
            if b == 0:
                members |= p == 0.0
            weights[b] = weight[members].sum()
            confidences[b] = (weight * p)[members].sum()
            corrects[b] = (weight * hit)[members].sum()
        errors.append(binned_error(weights, confidences, corrects, norm))
    return float(np.mean(errors))


def brier_score(labels, probs, sample_weight=None):
    """Weighted mean of sum_k (p_k - onehot_k)**2, in float64."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    one_hot = np.eye(probs.shape[1])[labels]
    scores = ((probs - one_hot) ** 2).sum(axis=1)
    weight = np.ones(len(labels))
    if sample_weight is not None:
        weight = np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1), weight.shape
        )
    if weight.sum() == 0:
        return 0.0
    return float((weight * scores).sum() / weight.sum())


def brier_decomposition(labels, probs, num_bins=15, sample_weight=None):
    """Murphy's terms over equal-width top-label confidence bins, by groups."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, np.shape(probs)[-1])
    labels = np.asarray(labels).reshape(-1)
    one_hot = np.eye(probs.shape[1])[labels]
    weight = np.ones(len(labels))
    if sample_weight is not None:
        weight = np.broadcast_to(
            np.asarray(sample_weight, np.float64).reshape(-1), weight.shape
        )
    total = weight.sum()
    base_rate = (weight[:, None] * one_hot).sum(axis=0) / total
    confidence = probs.max(axis=1)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    terms = dict.fromkeys(
        ["reliability", "resolution", "within_bin_variance", "within_bin_covariance"],
        0.0,
    )
    for b in range(num_bins):
        members = (confidence > edges[b]) & (confidence <= edges[b + 1])
        if b == 0:
            members |= confidence == 0.0
        w = weight[members]
        if w.sum() == 0:
            continue
        p, y = probs[members], one_hot[members]
        mean_p = (w[:, None] * p).sum(0) / w.sum()
        mean_y = (w[:, None] * y).sum(0) / w.sum()
        terms["reliability"] += w.sum() * ((mean_p - mean_y) ** 2).sum() / total
        terms["resolution"] += w.sum() * ((mean_y - base_rate) ** 2).sum() / total
        terms["within_bin_variance"] += (w * ((p - mean_p) ** 2).sum(1)).sum() / total
        terms["within_bin_covariance"] += (
            w * ((p - mean_p) * (y - mean_y)).sum(1)
        ).sum() / total
    terms["uncertainty"] = float((base_rate * (1 - base_rate)).sum())
    terms["brier"] = brier_score(labels, probs, sample_weight)
    return terms
