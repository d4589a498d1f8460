#!/usr/bin/env bash
# The GPU check, one command, no network: scripts/gpu_check.sh [OUTDIR] (default gpu_report).
# 1. installs the wheelhouse (.whl/, from `make wheelhouse`) into a temporary folder on
#    PYTHONPATH, never into the system environment;
# 2. the environment (GPU, driver, CUDA, versions): no CUDA device is one error line, exit 2;
# 3. pytest -m gpu (tests/gpu/);
# 4. bench table 8: the GPU rows against timm and torchvision;
# 5. a fit of Swin-T 224 through the CLI on generated JPEGs (GPU_CHECK_FIT_SECONDS, 75);
# 6. report.md + report.json in OUTDIR, the summary table printed last.
# Each step has a time limit (230 + 130 + 110 s: at most about 8 minutes with the set-up;
# not yet timed on a GPU) and a failing step
# does not stop the ones after it; the exit code is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="$(mkdir -p "${1:-gpu_report}" && cd "${1:-gpu_report}" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: $PY cannot import torch: run the GPU check with the Python that has torch (PYTHON=/path/to/python $0)" >&2
    exit 2
fi

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    SITE="$(mktemp -d)/site"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --root-user-action=ignore --target "$SITE" .whl/*.whl; then
        echo "error: the wheelhouse in .whl/ did not install; run 'make wheelhouse' again on a machine with the package index" >&2
        exit 2
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" -m swin_lightning.bench.gpu_check env "$OUT" >/dev/null || exit 2
cat "$OUT/env.json"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

failed=0
PHASES="$OUT/phases.json"
echo '{}' >"$PHASES"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, record exit code and time
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    # SIGINT first: pytest then still writes its JUnit file for the tests that ran
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local code=$?
    [ "$code" -ne 0 ] && failed=1
    "$PY" - "$PHASES" "$name" "$code" "$((SECONDS - start))" <<'PYEOF'
import json, sys
path, name, code, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
phases = json.load(open(path))
phases[name] = {"exit_code": code, "seconds": seconds}
json.dump(phases, open(path, "w"), indent=1)
PYEOF
}

step tests "${GPU_CHECK_TEST_SECONDS:-230}" "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" -o addopts="-ra --strict-markers"
step bench "${GPU_CHECK_BENCH_SECONDS:-130}" "$PY" -m swin_lightning bench --tables 8 \
    --out "$OUT/bench.md" --gpu_budget_s 40
step fit "${GPU_CHECK_FIT_LIMIT:-110}" "$PY" -m swin_lightning.bench.gpu_check fit "$OUT"
"$PY" -m swin_lightning.bench.gpu_check report "$OUT" || failed=1
exit $failed
