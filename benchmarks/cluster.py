"""KerasTuner's distributed mode, as its environment variables describe it."""

import os

PORT_VARIABLE = "KERASTUNER_ORACLE_PORT"


def distributed_role():
    """Returns "chief", "worker", or None (not in distributed mode).

    Raises:
        ValueError: if `KERASTUNER_ORACLE_IP` is set without the port or the
            tuner ID.
    """
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    missing = [
        name
        for name in (PORT_VARIABLE, "KERASTUNER_TUNER_ID")
        if name not in os.environ
    ]
    if missing:
        raise ValueError(
            "KERASTUNER_ORACLE_IP is set, so the run is distributed, but "
            f"{' and '.join(missing)} is not set."
        )
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def tuner_id():
    return os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
