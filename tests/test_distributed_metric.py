"""The calibration metrics are exact under data parallelism.

`model.evaluate` under `keras.distribution.DataParallel` over 4 JAX CPU
devices, and under `tf.distribute.MirroredStrategy` over two logical CPUs,
gives the single-device value. The device set-up must happen before the
backend initialises, so each case runs in its own Python process; each runs
once, from the test session of its own backend.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ece_reference as reference
import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

COMMON = """
import json
import keras
import numpy as np
from keras_label_relax import BrierScore
from keras_label_relax import ClasswiseCalibrationError
from keras_label_relax import ExpectedCalibrationError


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            ExpectedCalibrationError(num_bins=10, from_logits=True),
            ExpectedCalibrationError(
                num_bins=10, from_logits=True, norm="l2", name="rms"
            ),
            ExpectedCalibrationError(
                num_bins=10, from_logits=True, binning="equal_mass", name="mass"
            ),
            ClasswiseCalibrationError(num_bins=10, from_logits=True, name="cw"),
            BrierScore(from_logits=True, name="brier"),
        ],
        weighted_metrics=[
            ExpectedCalibrationError(num_bins=10, from_logits=True, name="w_ece"),
            ExpectedCalibrationError(
                num_bins=10, from_logits=True, norm="l2", name="w_rms"
            ),
            ExpectedCalibrationError(
                num_bins=10,
                from_logits=True,
                norm="max",
                binning="equal_mass",
                name="w_mass",
            ),
            ClasswiseCalibrationError(
                num_bins=10, from_logits=True, norm="l2", name="w_cw"
            ),
            BrierScore(from_logits=True, name="w_brier"),
        ],
    )
    return model


rng = np.random.default_rng(0)
x = rng.standard_normal((512, 4)).astype("float32")
y = rng.integers(0, 3, 512)
weights = rng.uniform(0, 2, 512).astype("float32")


def evaluate(model):
    return model.evaluate(
        x, y, sample_weight=weights, batch_size=64, verbose=0, return_dict=True
    )


single_model = build()
single = evaluate(single_model)
logits = keras.ops.convert_to_numpy(single_model(x)).tolist()
"""

JAX_SCRIPT = """
import jax

devices = keras.distribution.list_devices("cpu")
assert len(devices) == 4, devices
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
parallel_model = build()
parallel_model.set_weights(single_model.get_weights())
parallel = evaluate(parallel_model)
replicas = len(parallel_model.layers[0].kernel.value.sharding.device_set)
print("RESULT " + json.dumps(
    {"single": single, "parallel": parallel, "logits": logits, "replicas": replicas}
))
"""

TF_SETUP = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
"""

TF_SCRIPT = """
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    parallel_model = build()
parallel_model.set_weights(single_model.get_weights())
parallel = evaluate(parallel_model)
print("RESULT " + json.dumps(
    {
        "single": single,
        "parallel": parallel,
        "logits": logits,
        "replicas": strategy.num_replicas_in_sync,
    }
))
"""


def run_script(backend, script, extra_env=None):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    pytest.fail(f"{backend} script failed:\n{completed.stdout}\n{completed.stderr}")


def check(result, expected_replicas):
    assert result["replicas"] == expected_replicas
    rng = np.random.default_rng(0)
    rng.standard_normal((512, 4))
    labels = rng.integers(0, 3, 512)
    weights = rng.uniform(0, 2, 512).astype(np.float32)
    probs = reference.softmax(np.array(result["logits"], np.float32))

    def ece(norm):
        return functools.partial(reference.calibration_error, num_bins=10, norm=norm)

    cases = {
        "ece": (ece("l1"), None, 1e-5),
        "rms": (ece("l2"), None, 1e-5),
        "w_ece": (ece("l1"), weights, 1e-5),
        "w_rms": (ece("l2"), weights, 1e-5),
        "mass": (
            functools.partial(reference.equal_mass_calibration_error, num_bins=10),
            None,
            1e-3,
        ),
        "w_mass": (
            functools.partial(
                reference.equal_mass_calibration_error, num_bins=10, norm="max"
            ),
            weights,
            1e-2,
        ),
        "cw": (
            functools.partial(reference.classwise_calibration_error, num_bins=10),
            None,
            1e-5,
        ),
        "w_cw": (
            functools.partial(
                reference.classwise_calibration_error, num_bins=10, norm="l2"
            ),
            weights,
            1e-5,
        ),
        "brier": (reference.brier_score, None, 1e-5),
        "w_brier": (reference.brier_score, weights, 1e-5),
    }
    for name, (compute, sample_weight, tolerance) in cases.items():
        single = result["single"][name]
        parallel = result["parallel"][name]
        expected = compute(labels, probs, sample_weight=sample_weight)
        assert parallel == pytest.approx(single, abs=1e-6), name
        assert single == pytest.approx(expected, abs=tolerance), name


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="runs once, from the JAX test session"
)
def test_jax_data_parallel_over_four_devices():
    result = run_script(
        "jax", COMMON + JAX_SCRIPT, {"JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    )
    check(result, expected_replicas=4)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="runs once, from the TensorFlow test session",
)
def test_tensorflow_mirrored_strategy_over_two_cpus():
    result = run_script("tensorflow", TF_SETUP + COMMON + TF_SCRIPT)
    check(result, expected_replicas=2)
