"""Label handling shared by the losses and the calibration metric.

Labels come either as integer class ids (one rank below the predictions, or
with a trailing axis of size 1) or as vectors over the classes with the
predictions' shape (one-hot or probabilities). The rank tells them apart.
"""

from keras import ops

SPARSE = "sparse"
DENSE = "dense"


def label_kind(y_true, y_pred):
    """Returns `SPARSE` for class ids, `DENSE` for class vectors.

    Raises:
        ValueError: if the shapes fit neither form.
    """
    true_shape = tuple(y_true.shape)
    pred_shape = tuple(y_pred.shape)
    if len(pred_shape) < 1:
        raise ValueError(
            "`y_pred` must have a class axis (rank >= 1). "
            f"Received: y_pred.shape={pred_shape}"
        )
    batch_shape = pred_shape[:-1]
    num_classes = pred_shape[-1]
    if len(true_shape) == len(batch_shape) and _compatible(true_shape, batch_shape):
        return SPARSE
    if len(true_shape) == len(pred_shape) and _compatible(true_shape[:-1], batch_shape):
        if true_shape[-1] == 1 and num_classes != 1:
            return SPARSE
        if _dims_compatible(true_shape[-1], num_classes):
            return DENSE
    raise ValueError(
        "`y_true` must hold class ids of shape `y_pred.shape[:-1]` (or with a "
        "trailing axis of 1) or class vectors of shape `y_pred.shape`. "
        f"Received: y_true.shape={true_shape}, y_pred.shape={pred_shape}"
    )


def class_ids(y_true, y_pred):
    """Returns int32 class ids of shape `y_pred.shape[:-1]`.

    Class vectors give their argmax; float-typed ids (as Keras casts them)
    are cast back to integers.
    """
    if label_kind(y_true, y_pred) == DENSE:
        return ops.cast(ops.argmax(y_true, axis=-1), "int32")
    if len(y_true.shape) == len(y_pred.shape):
        y_true = ops.squeeze(y_true, axis=-1)
    if "int" not in str(y_true.dtype):
        y_true = ops.round(y_true)
    return ops.cast(y_true, "int32")


def _dims_compatible(a, b):
    return a is None or b is None or a == b


def _compatible(shape_a, shape_b):
    return all(_dims_compatible(a, b) for a, b in zip(shape_a, shape_b, strict=True))
