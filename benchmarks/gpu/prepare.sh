#!/usr/bin/env bash
# Run here, in the repository root, before `fashion_mnist.sh` goes to a lent
# GPU machine: that machine has JAX and no network, but no Keras, no
# KerasTuner and no data. This puts wheels of what it lacks into .whl/ and
# the Fashion-MNIST files into .data/, both ignored by git; carry both.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl .data
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl keras==3.15.1 keras-tuner==1.4.8 kt-legacy==1.0.5 namex==0.1.0 optree==0.20.0
cp /usr/share/datasets/fashion-mnist/*.gz .data/
du -sh .whl .data
