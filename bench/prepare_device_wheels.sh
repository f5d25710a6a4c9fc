#!/usr/bin/env bash
# Fill the ignored folder .whl/ with the wheels the device image lacks (bench/device_wheels.py):
# the GPU suite's imports missing from bench/device_image.txt (diffusers, jsonschema, fvcore) and
# their missing dependencies, at exactly the versions requirements/lock.txt pins, for the image's
# Python (3.12) and platform (manylinux x86_64):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 ... --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# and, for a package published as an sdist only (fvcore, iopath), a pure-Python wheel built here
# with `pip wheel --no-deps`. Writes .whl/MANIFEST.txt (each wheel and why it is there) and
# .whl/PYTHON (the Python they are for). Needs PyPI; run it here, before the device call that
# carries .whl (bench/README.md). bench/gpu_suite.sh installs them (its preflight).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m bench.device_wheels prepare --dest .whl "$@"
