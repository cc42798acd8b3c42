#!/usr/bin/env bash
# The Qwen3-1.7B family table (issue 23): every decoder family on the public checkpoints of one
# target size, on gsm8k_cot, humaneval, mbpp and two minerva_math subjects, with scores and paired
# speed, into results/gpu/<gpu-name>/qwen3-family/ (one `tidar-bench run` folder per row, its
# command in commands.txt, the environment in environment.json, wall times in log.txt).
# For a GPU machine with Hugging Face Hub access (downloads about 12 GB once); budget: 20 minutes
# on one H100 at the default LIMIT=10 documents per task (each row prints its wall time).
#
#   bash scripts/qwen3_family.sh                                     # GPU, hub ids below
#   LIMIT=20 MAX_GEN_TOKS=512 bash scripts/qwen3_family.sh           # a larger table
#   bash scripts/qwen3_family.sh --replica --device cpu --out DIR    # CPU replica mode (tests/test_qwen3_family.py)
#
# Every row runs `ar` on its own checkpoint in the same process as the row's decoder, so each
# speedup is paired (the SDAR and TiDAR bodies are Qwen3-1.7B's: their `ar` costs what Qwen3's
# does per token; their `ar` scores mean nothing, those models are not trained for it). Prompts are
# the tasks' own few-shot prompts without a chat template, the same for every model (CHAT=1 adds
# --apply-chat-template). MAX_GEN_TOKS (default 256) caps every task's generation length, to keep
# the budget: minerva answers longer than that score as wrong. --replica: tiny random checkpoints
# in each row's real layout (scripts/qwen3_family_replicas.py, in a temp folder, removed at exit),
# gsm8k_cot, one document, 8 new tokens, eager: the script's plumbing, not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."

REPLICA=0
DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --replica) REPLICA=1 ;;
    --device) DEVICE="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bash scripts/qwen3_family.sh [--replica] [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
TB=("$PY" -m tidar_bench.cli)
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device here; use --replica --device cpu for the CPU replica mode" >&2; exit 2
fi

# The checkpoints (override any with the environment variable of the same name).
QWEN3=${QWEN3:-Qwen/Qwen3-1.7B}
SDAR=${SDAR:-JetLM/SDAR-1.7B-Chat}
ANGELSLIM=${ANGELSLIM:-AngelSlim/Qwen3-1.7B_eagle3}   # AngelSlim naming (a mirror, aoiandroid/Qwen3-1.7B_eagle3, has its card)
DSPARK=${DSPARK:-rasyosef/Qwen3-1.7B-DSpark}
TIDAR=${TIDAR:-TiDAR-LM/TiDAR-1.7b-sft-0.5M-3e-5-20K}
TASKS=${TASKS:-gsm8k_cot,humaneval,mbpp,minerva_math_algebra,minerva_math_prealgebra}
LIMIT=${LIMIT:-10}
MAX_GEN_TOKS=${MAX_GEN_TOKS:-256}
COMPILE=on
DTYPE=auto
if [ $REPLICA -eq 1 ]; then
  REPLICAS=$(mktemp -d)
  trap 'rm -rf "$REPLICAS"' EXIT
  "$PY" scripts/qwen3_family_replicas.py "$REPLICAS" > /dev/null
  QWEN3=$REPLICAS/qwen3; ANGELSLIM=$REPLICAS/angelslim; DSPARK=$REPLICAS/dspark; SDAR=$REPLICAS/sdar; TIDAR=$REPLICAS/tidar
  TASKS=gsm8k_cot; LIMIT=1; MAX_GEN_TOKS=8; COMPILE=off; DTYPE=float32  # one task, one document: plumbing, seconds
fi

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if '$DEVICE' == 'cuda' else 'cpu')")
OUT=${OUT:-results/gpu/$NAME/qwen3-family}
mkdir -p "$OUT"
: > "$OUT/commands.txt"
: > "$OUT/log.txt"
"$PY" -c "import json, sys; from tidar_bench.provenance import environment; \
json.dump(environment(), open(sys.argv[1], 'w'), indent=2)" "$OUT/environment.json"
COMMON=(--tasks "$TASKS" --limit "$LIMIT" --gen-kwargs "max_gen_toks=$MAX_GEN_TOKS" --allow-code-exec
        --device "$DEVICE" --dtype "$DTYPE" --compile "$COMPILE")
[ "${CHAT:-0}" = 1 ] && COMMON+=(--apply-chat-template)

FAILED=""
row() {  # row NAME CHECKPOINT DECODERS [extra run options]: one run folder, a failing row does not stop the rest
  local name=$1 model=$2 decoders=$3; shift 3
  local cmd=("${TB[@]}" run --model "$model" --decoders "$decoders" --out "$OUT/$name" "${COMMON[@]}" "$@")
  echo "${cmd[*]}" >> "$OUT/commands.txt"
  local t0=$SECONDS rc=0
  echo "== $name: ${cmd[*]}" | tee -a "$OUT/log.txt"
  "${cmd[@]}" < /dev/null >> "$OUT/log.txt" 2>&1 || rc=$?  # no prompt (e.g. remote code) can wait on a terminal
  echo "== $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  [ $rc -eq 0 ] || FAILED="$FAILED $name"
}

# The table. eagle and dflash join the qwen3 row, so they are paired with the same compiled `ar` run;
# --draft and dflash.draft= take hub ids as --model does.
row qwen3 "$QWEN3" "ar,eagle,dflash" --draft "$ANGELSLIM" --decoder-arg "dflash.draft=$DSPARK"  # AngelSlim EAGLE-3, speculators DSpark
row sdar "$SDAR" "ar,bd,bd(separate_commit=true)"                               # SDAR as bd: block 4, steps 4, dynamic rule, threshold 0.9
row tidar "$TIDAR" "ar,tidar"                                                    # the TiDAR-LM preset (mask 151662, block 16)

if [ -n "$FAILED" ]; then
  echo "qwen3_family: failed rows:$FAILED (see $OUT/log.txt)" >&2
  exit 1
fi
echo "qwen3_family: all rows passed; results in $OUT"
