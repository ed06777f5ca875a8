#!/usr/bin/env bash
# Regenerates the screenshots in docs/ui.md from real runs of the current code on the roads frames:
# two linear-probe finetunes (3 epochs; WITH_FULL=1 adds a freeze-unfreeze run and an SVM head), then
# `transferkit ui` photographed by headless Chromium.
#   docs/ui_screenshots.sh [WORK_DIR]        (needs ../shared/data/roads, ../shared/weights, chromium)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/transferkit-ui-XXXX)}
python=${PYTHON:-python}
shared=${SHARED:-$repo/../shared}
export TRANSFERKIT_WEIGHTS_DIR=$shared/weights HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
mkdir -p "$work" && cd "$work"
roads=$shared/data/roads
tk() { nice -n 10 "$python" -m transferkit "$@"; }

tk finetune --backbone tf_efficientnet_lite0 --data "$roads" --strategy linear-probe --epochs 3 --name lite0-probe
tk finetune --backbone mobilenetv2_100 --data "$roads" --strategy linear-probe --epochs 3 --name mnv2-probe
if [ -n "${WITH_FULL:-}" ]; then  # slower: a full freeze-unfreeze run and an SVM head too
  tk finetune --backbone tf_efficientnet_lite0 --data "$roads" --strategy freeze-unfreeze --epochs 3 --img-size 160 \
    --name lite0-ffu
  tk svm --backbone tf_efficientnet_lite0 --data "$roads" --model logistic --out svm-lite0
fi

port=5077
"$python" -m transferkit ui --port $port > ui.log 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
url=http://127.0.0.1:$port
experiment=$(curl -s "$url/api/2.0/mlflow/experiments/get-by-name?experiment_name=roads" |
  "$python" -c "import json, sys; print(json.load(sys.stdin)['experiment']['experiment_id'])")
run_id() { "$python" -c "import json; print(json.load(open('runs/$1/result.json'))['mlflow_run_id'])"; }
first=$(run_id lite0-probe) second=$(run_id mnv2-probe)

shot() {  # shot OUT.png URL [HEIGHT]
  chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-sync \
    --user-data-dir="$work/profile" --window-size=1400,"${3:-1000}" --virtual-time-budget=20000 \
    --screenshot="$repo/docs/$1" "$2" 2> /dev/null
}
shot ui-runs.png "$url/#/experiments/$experiment/runs?orderByKey=metrics.%60val_accuracy%60&orderByAsc=false"
shot ui-run.png "$url/#/experiments/$experiment/runs/$first"
shot ui-artifact.png "$url/#/experiments/$experiment/runs/$first/artifacts/val/confusion_matrix.png"
shot ui-compare.png "$url/#/compare-runs?runs=%5B%22$first%22,%22$second%22%5D&experiments=%5B%22$experiment%22%5D" 2200
echo "screenshots written to $repo/docs (runs in $work)"
