#!/usr/bin/env bash
# The one-GPU check (an H100 or H200), from a fresh copy of the repository, in at most 8 minutes:
#
#   scripts/gpu-check.sh OUTDIR [--dry-run]
#
# 1 setup       .ci/setup and the gpu extra (pynvml, for MLflow's GPU system metrics)
# 2 env         nvidia-smi, torch and CUDA versions, pip freeze
# 3 gpu-tests   pytest -m gpu (CUDA equals CPU, training and distillation steps, bench, GPU system metrics)
# 4 bench       calodistill bench --device cuda at CaloChallenge ds1 CaloFlow size: teacher and student at
#               batch 1/100/10000, the student's matmul floor, training and distillation throughput
# 5 pipeline    a ds1-size teacher and student trained for a few minutes (dags/calochallenge_ds1_photons.yaml
#               reduced: ingest, train_teacher, distill, generate_student), tracked in OUTDIR/mlflow.db
# 6 precision   TF32 and bf16: teacher NLL shift (acceptable below 0.1 %) and student µs per shower
# 7 mlflow      the pipeline's MLflow runs with their GPU system metrics, as JSON
# Everything lands in OUTDIR (one log per step, JSON, markdown, runs/, mlflow.db); SUMMARY.md lists each
# step's status and time, then the tables. Each step has its own time limit, and the whole run a budget
# (GPU_CHECK_BUDGET_S, default 470 s) that clips the later limits; a step that fails or runs out of time
# is reported and the next one runs. --dry-run prints the steps and their commands without running them.
set -uo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }

OUT=""
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu-check: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) [ -z "$OUT" ] || { echo "gpu-check: one OUTDIR only" >&2; exit 2; }; OUT=$arg ;;
    esac
done
[ -n "$OUT" ] || { usage >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
PY=.venv/bin/python
CALO=.venv/bin/calodistill
RUNS="$OUT/runs"
DAG="$OUT/ds1_check.yaml"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
: > "$OUT/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    ((limit > left)) && limit=$left
    if ((DRY)); then
        printf '[%s] limit %ss:' "$name" "$limit"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    if ((limit < 5)); then
        printf '%s\tskipped (time budget spent)\t0\n' "$name" >> "$OUT/steps.tsv"
        echo "== $name: skipped, the ${BUDGET}s budget is spent"
        return 0
    fi
    echo "== $name (at most ${limit}s)"
    local t0 rc outcome
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) outcome=ok ;;
        124|137) outcome="timed out after ${limit}s" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$outcome" "$(($(date +%s) - t0))" >> "$OUT/steps.tsv"
    echo "   $outcome in $(($(date +%s) - t0))s; log: $OUT/$name.log"
    return 0
}

# 1. setup: the virtual environment, then the gpu extra
step setup 100 bash -c 'bash .ci/setup && .venv/bin/python -m pip install -q -e ".[dev,gpu]"'

# 2. environment
step env 15 bash -c "nvidia-smi; $PY -c 'import torch, calodistill; print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, \"devices\", torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() \
else \"NO CUDA\")'; $PY -m pip freeze"

# 3. the gpu-marked tests
step gpu-tests 75 "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider --junitxml "$OUT/gpu-tests.xml"

# 4. teacher vs student at ds1 CaloFlow size (random-initialised: timing does not depend on training)
step bench 90 "$CALO" bench --device cuda --geometry calochallenge-1-photons --batches 1,100,10000 \
    --sections sampling,floor,training --budget-s 12 --repeats 3 --warmup 1 --train-steps 5 \
    --out "$OUT/bench.json" --markdown "$OUT/bench.md" --overwrite

# 5. a ds1-size teacher and student, trained for a few minutes (the DAG reduced to the training stages)
step dag 10 "$PY" -c "
import sys, yaml
d = yaml.safe_load(open('dags/calochallenge_ds1_photons.yaml'))
d['name'] = 'ds1_check'
d['description'] = 'scripts/gpu-check.sh: dags/calochallenge_ds1_photons.yaml, training stages, a few minutes'
d['tracking'] = {**d['tracking'], 'registered_model': None, 'system_metrics_interval': 2}
d['stages'] = {k: v for k, v in d['stages'].items() if k in ('ingest', 'train_teacher', 'distill', 'generate_student')}
yaml.safe_dump(d, open(sys.argv[1], 'w'), sort_keys=False)
" "$DAG"
step pipeline 160 "$CALO" run "$DAG" --runs-dir "$RUNS" \
    --set 'ingest.inputs.sources=["synth:calochallenge-1-photons?n=30000&seed=21&spectrum=ladder&particle=gamma"]' \
    --set train_teacher.flow1.train.epochs=10 --set train_teacher.flow1.train.patience=0 \
    --set train_teacher.teacher.train.epochs=12 --set train_teacher.teacher.train.patience=0 \
    --set train_teacher.check_samples=200 --set train_teacher.check_batch_size=200 \
    --set distill.train.epochs=6 --set distill.train.patience=0 --set distill.distill.kl_samples=2000 \
    --set distill.nll_subset=200 --set distill.check_samples=2000 --set distill.teacher_check_samples=100 \
    --set distill.teacher_timing_batch=100 --set distill.timing_repeats=3 \
    --set generate_student.n=20000

# 6. TF32 and bf16 (the trained models when the pipeline got that far)
step precision 40 "$PY" scripts/precision_check.py "$OUT/precision.json" \
    --model-dir "$RUNS/ds1_check/train_teacher/model" --model-dir "$RUNS/ds1_check/distill/model"

# 7. the MLflow runs and their GPU system metrics
step mlflow 20 "$PY" -c "
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
out = []
for exp in c.search_experiments():
    for r in c.search_runs([exp.experiment_id]):
        gpu = {k: v for k, v in r.data.metrics.items() if k.startswith('system/gpu')}
        out.append({'run': r.info.run_name, 'run_id': r.info.run_id, 'status': r.info.status,
                    'device': r.data.tags.get('device'), 'cuda_visible_devices': r.data.tags.get('cuda_visible_devices'),
                    'metrics': {k: v for k, v in r.data.metrics.items() if not k.startswith('system/')},
                    'gpu_system_metrics': gpu})
json.dump(out, open(sys.argv[2], 'w'), indent=2)
print(json.dumps([{k: r[k] for k in ('run', 'status', 'device', 'gpu_system_metrics')} for r in out], indent=2))
" "$MLFLOW_TRACKING_URI" "$OUT/mlflow_runs.json"

if ((DRY)); then
    echo "[summary] $OUT/SUMMARY.md"
    exit 0
fi

# the summary: steps, targets, tables
"$PY" - "$OUT" "$BUDGET" "$(($(date +%s) - START))" > "$OUT/SUMMARY.md" 2> "$OUT/summary.log" <<'EOF' || cp "$OUT/steps.tsv" "$OUT/SUMMARY.md"
import json, re, sys
from pathlib import Path
out, budget, wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def read(name):
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""
gpu = re.search(r"devices \d+ (.+)", read("env.log"))
print(f"# GPU check: {gpu.group(1) if gpu else 'device unknown'}\n")
print(f"scripts/gpu-check.sh: {wall} s of a {budget} s budget.\n\n| step | outcome | seconds |\n|---|---|---|")
for line in read("steps.tsv").splitlines():
    print("| " + " | ".join(line.split("\t")) + " |")
tests = [l for l in read("gpu-tests.log").splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", l)]
print(f"\ngpu tests: {tests[-1].strip('= ') if tests else 'no result'}\n")
try:
    bench = json.loads(read("bench.json"))
    rows = {r["batch"]: r for r in bench["sampling"]["rows"]}
    r = rows.get(10000)
    if r:
        us = 1000 * r["student_fast"]["ms_per_shower"]
        print(f"Targets at batch 10 000: student {us:.3g} µs per shower (target ≤ 2; CaloFlow II 261, CaloINN 190); "
              f"speed-up over the teacher at the teacher's batch {r['teacher']['batch']}: "
              f"{r['speedup_fast']:.4g}× (target ≥ 300).\n" if r.get("speedup_fast") else
              f"Targets at batch 10 000: student {us:.3g} µs per shower (target ≤ 2).\n")
except (ValueError, KeyError, TypeError) as exc:
    print(f"bench: no result ({exc})\n")
for name, title in (("bench.md", "Benchmark"), ("precision.md", "TF32 / bf16")):
    if read(name):
        print(f"## {title}\n\n{read(name)}\n")
table = re.search(r"^stage .*?^total wall time.*?$(\n^MLflow.*$)?", read("pipeline.log"), re.M | re.S)
print("## Pipeline (ds1 size, a few minutes)\n\n```\n" + (table.group(0) if table else "no summary table: see pipeline.log")
      + "\n```\n")
try:
    runs = json.loads(read("mlflow_runs.json"))
    shown = [r for r in runs if r["gpu_system_metrics"]]
    print(f"MLflow ({out / 'mlflow.db'}): {len(runs)} runs, {len(shown)} with GPU system metrics"
          + (f", e.g. {shown[0]['run']}: " + ", ".join(f"{k} = {v:.4g}" for k, v in sorted(shown[0]['gpu_system_metrics'].items())[:4])
             if shown else "") + ".")
except (ValueError, KeyError, TypeError):
    print("MLflow: no runs read")
EOF
echo "== summary: $OUT/SUMMARY.md"
cat "$OUT/SUMMARY.md"
