#!/usr/bin/env bash
# Rehearse the device call here, so that an import error never costs device time: a Python 3.12
# virtual environment holding only the device image's packages runs `bench/gpu_suite.sh --tiny` to
# the end, with the carried wheels (.whl/) installed by the suite's own preflight, as on the device.
#   bash bench/rehearse_device_image.sh [more gpu_suite.sh arguments]
# The environment: the packages of requirements/lock.txt that bench/device_image.txt lists, at the
# image's recorded versions where known (torch 2.11.0, numpy 2.5.2, transformers 5.17.0,
# huggingface-hub 1.33.0, ...; `python3 -m bench.device_wheels image-requirements`), then checked to
# hold nothing the image lacks (`check-image`). Built once (~5 GB, mostly torch's CUDA libraries,
# from PyPI) and reused while that list is unchanged.
#   CDGMAE_PYTHON312        a Python 3.12 interpreter (else python3.12 on PATH, pyenv's, uv's);
#                           `uv python install 3.12` needs github.com, which this workplace cannot reach
#   CDGMAE_REHEARSAL_VENV   the environment (default ~/.cache/cdgmae/device-image-py312)
#   GPU_SUITE_OUT           the suite's log and figures (default results/device-rehearsal)
# Exit 3: no Python 3.12 here (tests/bench/test_gpu_suite.py then skips, saying so).
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local candidates=() c
  [ -n "${CDGMAE_PYTHON312:-}" ] && candidates+=("$CDGMAE_PYTHON312")
  candidates+=(python3.12)
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    [ -x "$c" ] && candidates+=("$c")
  done
  if command -v uv >/dev/null 2>&1; then
    c=$(uv python find 3.12 2>/dev/null || true)
    [ -n "$c" ] && candidates+=("$c")
  fi
  for c in "${candidates[@]}"; do
    # a pyenv shim exists for versions that are not active: run it to know
    if "$c" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
      "$c" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  return 1
}

if [ "${1:-}" = "--find-python" ]; then
  find_python312 || exit 3
  exit 0
fi
if ! py=$(find_python312); then
  echo "rehearse_device_image: no Python 3.12 found (set CDGMAE_PYTHON312; uv python install 3.12 needs github.com)" >&2
  exit 3
fi

venv=${CDGMAE_REHEARSAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cdgmae/device-image-py312}
reqs=$(python3 -m bench.device_wheels image-requirements)
stamp=$({
  echo "$py"
  "$py" --version
  echo "$reqs"
} | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.stamp" 2>/dev/null || true)" != "$stamp" ]; then
  echo "# rehearse: building $venv: $("$py" --version) ($py) and the device image's packages"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "$py" -m venv "$venv"
  printf '%s\n' "$reqs" >"$venv/requirements.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile --only-binary=:all: \
    -r "$venv/requirements.txt"
  python3 -m bench.device_wheels check-image "$venv/bin/python"
  echo "$stamp" >"$venv/.stamp"
else
  echo "# rehearse: reusing $venv ($("$venv/bin/python" --version))"
fi

bash bench/prepare_device_wheels.sh >/dev/null
echo "# rehearse: .whl/ holds $(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l) wheels for Python $(cat .whl/PYTHON)"
export GPU_SUITE_OUT=${GPU_SUITE_OUT:-results/device-rehearsal}
# as on the device: python3 is the image's, nothing of this machine's Python leaks in
exec env -u PYTHONPATH -u PYTHONHOME PYTHONNOUSERSITE=1 VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" \
  bash bench/gpu_suite.sh --tiny "$@"
