#!/usr/bin/env bash
# Every GPU path once, one table per section, a summary and the derived figures (bench/gpu_suite.py;
# bench/README.md has the one-call device command).
#   bash bench/gpu_suite.sh                  # one GPU, paper shapes, <= 7 minutes
#   bash bench/gpu_suite.sh --tiny           # tiny sizes on the CPU
#   bash bench/gpu_suite.sh --only sldm-train sldm-sample
# Output: the log (gpu_suite.log) and the figures (figures.md, figures.json) go to $GPU_SUITE_OUT,
# else $OUT (the device tool's folder that comes back), else results/gpu_suite/.
# Preflight: wheels in .whl/ made for this python3 (bench/prepare_device_wheels.sh) are installed
# into a private folder put first on PYTHONPATH (the device README's recipe); the suite then
# imports every module its sections need and prints the versions before the first section.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${GPU_SUITE_OUT:-${OUT:-results/gpu_suite}}
mkdir -p "$out"
log="$out/gpu_suite.log"
: >"$log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!

# the tables, not the libraries' chatter: no progress bars, no hub access, unbuffered output
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error

pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
echo "# gpu_suite.sh $* | $(date -u +%Y-%m-%dT%H:%M:%SZ) | python3 $pyver at $(command -v python3) | out $out"
if compgen -G ".whl/*.whl" >/dev/null; then
  want=$(cat .whl/PYTHON 2>/dev/null || echo "?")
  if [ "$want" = "$pyver" ]; then
    # a folder of this run's own: two suites at once (two test sessions) must not replace each
    # other's packages mid-import
    site=$(mktemp -d "${TMPDIR:-/tmp}/cdgmae-device-site.XXXXXX")
    trap 'rm -rf "$site"' EXIT
    echo "# preflight: installing $(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l) carried wheels into $site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "# preflight: .whl/ holds wheels for Python $want, this python3 is $pyver: not installed"
  fi
fi

# the driver in the background so that a TERM / INT / HUP reaches it at once (bash runs traps only
# between commands): it kills its running section's process group, whose processes also die with
# their parent (PR_SET_PDEATHSIG) if the driver itself is killed
python3 -u -m bench.gpu_suite --out "$out" "$@" &
driver=$!
trap 'kill -TERM "$driver" 2>/dev/null; wait "$driver"; exit 143' TERM INT HUP
set +e
wait "$driver"
rc=$?
set -e
trap - TERM INT HUP
echo "# gpu_suite.sh: exit $rc; log and figures in $out"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null || true
exit "$rc"
