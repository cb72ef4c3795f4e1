"""One export path: registration for saving plus the public API list."""

import keras

PACKAGE = "keras_label_relax"

# Filled by `export`; `keras_label_relax.__all__` is this list.
PUBLIC_NAMES = []


def export(symbol):
    """Registers a class for `.keras` saving as `keras_label_relax>Name` and
    lists a class or function in the package's public API."""
    if isinstance(symbol, type):
        symbol = keras.saving.register_keras_serializable(package=PACKAGE)(symbol)
    PUBLIC_NAMES.append(symbol.__name__)
    return symbol
