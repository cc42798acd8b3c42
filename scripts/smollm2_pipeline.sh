#!/usr/bin/env bash
# SmolLM2-135M-Instruct (dequantized Q4_1, scripts/smollm2.py) end to end on a CPU: distilled data, an
# EAGLE-3 head, a DFlash drafter, TiDAR and block diffusion trained here, every decoder measured on real
# GSM8K and HumanEval, latency profile, figures. One command, staged and resumable:
#
#   bash scripts/smollm2_pipeline.sh                      # every stage not finished yet, in order
#   bash scripts/smollm2_pipeline.sh --from tidar         # that stage and the ones after it
#   bash scripts/smollm2_pipeline.sh --stage eagle        # one stage
#   nohup bash scripts/smollm2_pipeline.sh > smollm2.log 2>&1 &       # in the background
#   bash scripts/smollm2_pipeline.sh --smoke              # tiny steps and few items, to prove it works
#   bash scripts/smollm2_pipeline.sh --stage run --runs gsm8k_tidar,gsm8k_bd   # some run folders only
#
# Resume: a stage whose output is complete is skipped; a killed training stage is continued from its
# newest --save-every checkpoint with `--resume` (same weights, optimizer, schedule, RNG, data position);
# distill works in chunks of prompts and skips the chunks already written; `tidar-bench run` skips the
# samples already in its folder. So the same command, re-run after any interruption, finishes the job.
# Across machines (a fresh machine has no cache): the distilled data and every finished run folder, its
# per-item cache included, are kept in results/smollm2/ (git). A fresh machine copies the distilled data
# back (training then reproduces the same weights on the same CPU model: training is deterministic at 1
# thread, checked by the sha256 each training stage records in training/<stage>/model.sha256; on another
# CPU model, e.g. Intel Xeon vs AMD EPYC, the losses agree to ~1e-5 but the weights differ, measured
# 2026-12-02) and reuses a committed run folder
# only when the checkpoints it measured have those same sha256 (runs/<name>/checkpoints.sha256); a run
# folder is committed only once it finished, so every paired ratio in it comes from one process.
# Outputs outside git: $TIDAR_BENCH_CACHE/smollm2-pipeline (default ~/.cache/tidar-bench/...):
# checkpoints, distilled data, full run folders. Into git: results/smollm2/ (the run tables, samples,
# figures, latency, training logs and stages.jsonl: each stage's exact command, start, end, wall time;
# SMOLLM2_RESULTS=DIR writes them elsewhere).
#
# Budget (full mode): about 4 hours of wall time on 2 CPU cores. Estimated from the --smoke run
# (results/smollm2/smoke/stages.jsonl, README there), which ran at 1 thread on a machine shared by 5
# engineers (load average 7-11 on 2 cores): per recipe, CPU seconds per training token = (tokens/s of its
# train_log) / (cpu_s / wall_s of its stage); the estimates below are those costs x tokens at 1 thread,
# idle (`python scripts/smollm2_budget.py` prints them); 2 threads should be faster (not measured),
# so they are upper bounds. The distill and run estimates are guesses, the weakest numbers here (the smoke
# distilled at batch 2 and decoded 16 tokens an item, eager): check stages.jsonl after the first chunk/run.
#   stage     what                                        steps x seqs x seq_len = tokens seen       est.
#   distill   greedy ar answers to 150 GSM8K + 50 MBPP     200 prompts, <= 256 new tokens each        ~30 min
#             train prompts, chat template, batch 8
#   eagle     EAGLE-3 head, draft vocab 8192, TTT 3        50 x 8 x 256 = 102,400 tokens (~21 ms)     ~35 min
#   dflash    DFlash drafter, 2 layers, block 8            50 x 8 x 256 = 102,400 tokens (~17 ms)     ~29 min
#   tidar     TiDAR continued pretraining, k = 8           32 x 4 x 256 = 32,768 tokens, each read    ~32 min
#             (whole model, lr 1e-4)                       twice: clean + masked (~59 ms)
#   bd        block-diffusion continued pretraining, 8     32 x 4 x 256 = 32,768 tokens (~47 ms)      ~25 min
#   run       gsm8k (5-shot chat, 50 items), humaneval     ar x3, hf, eagle, dflash, tidar, bd        ~90 min
#             (40 items, code executed), compiled
#   profile   profile-latency, plot, report (results.md: the tables, from the stored files)              ~5 min
# Each trainer also evaluates 4 held-out prompts (48 tokens) every 10 steps (--eval-every) and saves a
# resumable checkpoint every 10 steps. Tokens seen = optimizer steps x sequences per step x sequence
# length; the distilled set (measured: 200 chats, 58,591 tokens) is smaller, so eagle and dflash read it ~1.7 times.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
TB=${TB:-.venv/bin/tidar-bench}
PY=${PY:-.venv/bin/python}
STAGES="model prompts mask distill eagle dflash tidar bd run profile plot report"
MODE=full ONLY="" FROM="" RUNS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --stage) ONLY=$2; shift ;;
    --from) FROM=$2; shift ;;
    --runs) RUNS=${2//,/ }; shift ;;
    -h|--help) sed -n '2,26p' "$SELF"; exit 0 ;;
    *) echo "error: unknown option $1 (--smoke, --stage NAME, --from NAME, --runs A,B; stages: $STAGES)" >&2; exit 2 ;;
  esac
  shift
done
for s in $ONLY $FROM; do
  case " $STAGES " in *" $s "*) ;; *) echo "error: unknown stage $s (stages: $STAGES)" >&2; exit 2 ;; esac
done

CACHE=${TIDAR_BENCH_CACHE:-$HOME/.cache/tidar-bench}
if [ $MODE = full ]; then
  WORK=$CACHE/smollm2-pipeline RES=${SMOLLM2_RESULTS:-results/smollm2}
  N_GSM=150 N_MBPP=50 DISTILL_TOKENS=256 DISTILL_BATCH=8 CHUNK=40
  SEQ=256 SAVE=10 EVAL_EVERY=10 EVAL_LIMIT=4 EVAL_TOKENS=48
  E_STEPS=50 E_BATCH=8 D_STEPS=50 D_BATCH=8 T_STEPS=32 T_BATCH=4 B_STEPS=32 B_BATCH=4
  GSM_LIMIT=50 HE_LIMIT=40 CONTEXTS=256,1024 REPEATS=10
  RUN_ARGS=() PROFILE_ARGS=(--slots 1,2,4,8,16,32,64,128)
else  # every stage on a few items and 2 steps at the full run's seq_len (smaller batches): proves the commands
  # and the resume logic, and times each recipe per training token (cpu_s in stages.jsonl) for the budget
  # above; measures no score
  WORK=$CACHE/smollm2-smoke RES=${SMOLLM2_RESULTS:-results/smollm2/smoke}
  N_GSM=3 N_MBPP=1 DISTILL_TOKENS=64 DISTILL_BATCH=2 CHUNK=2
  SEQ=256 SAVE=1 EVAL_EVERY=2 EVAL_LIMIT=1 EVAL_TOKENS=16
  E_STEPS=2 E_BATCH=2 D_STEPS=2 D_BATCH=2 T_STEPS=2 T_BATCH=1 B_STEPS=2 B_BATCH=1
  GSM_LIMIT=1 HE_LIMIT=1 CONTEXTS=256 REPEATS=2
  RUN_ARGS=(--gen-kwargs max_gen_toks=16 --compile off)  # 16 tokens an item, no compilation wait
  PROFILE_ARGS=(--slots 1,8 --compile off)
fi
MODEL=$CACHE/smollm2/SmolLM2-135M-Instruct-Q4_1
mkdir -p "$WORK" "$RES"
LOG=$RES/stages.jsonl

# log_run STAGE CMD...: run a command, append {stage, command, start, end, wall_s, cpu_s, threads, rc} to
# stages.jsonl. cpu_s is what to budget from on a shared machine: wall time there depends on the others.
log_run() {
  local stage=$1; shift
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  times > "$WORK/.times0.$$"  # the shell's own `times` (no subshell): user and sys of its finished children
  echo "[$stage] $*" >&2
  "$@" || rc=$?
  t1=$(date +%s.%N)
  times > "$WORK/.times1.$$"
  $PY - "$LOG" "$stage" "$t0" "$t1" "$WORK/.times0.$$" "$WORK/.times1.$$" "$rc" "$MODE" "$@" <<'EOF'
import json, os, re, sys, time
sys.path.insert(0, os.getcwd())
from tidar_bench.provenance import portable_command  # no machine path in stages.jsonl: ~/.cache/..., relative
log, stage, t0, t1, f0, f1, rc, mode, *cmd = sys.argv[1:]

def children_cpu(f):  # second line of bash `times`: "XmY.YYYs XmY.YYYs" (user, sys of children)
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", open(f).read().splitlines()[1]))

c0, c1 = children_cpu(f0), children_cpu(f1)
iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None) \
    if os.path.exists("/proc/cpuinfo") else None  # training is bit-identical only on the same CPU model
rec = {"stage": stage, "mode": mode, "command": portable_command(cmd), "start": iso(t0), "end": iso(t1),
       "wall_s": round(float(t1) - float(t0), 1), "cpu_s": round(float(c1) - float(c0), 1),
       "threads": os.environ.get("OMP_NUM_THREADS"), "load_avg_1min_at_end": os.getloadavg()[0], "cpu": cpu,
       "rc": int(rc)}
with open(log, "a") as f:
    f.write(json.dumps(rec) + "\n")
EOF
  return $rc
}

# train STAGE OUT CMD...: skip when OUT holds the final model; else resume from OUT/checkpoints or start
train() {
  local stage=$1 out=$2; shift 2
  if [ -f "$out/train_log.jsonl" ] && [ -f "$out/config.json" ]; then echo "[$stage] done: $out" >&2; return; fi
  local resume=()
  if compgen -G "$out/checkpoints/step-*" > /dev/null; then resume=(--resume); fi
  log_run "$stage" "$@" --out "$out" --save-every $SAVE --eval-every $EVAL_EVERY --eval-prompts "$WORK/eval_prompts.jsonl" \
    --eval-limit $EVAL_LIMIT --eval-max-new-tokens $EVAL_TOKENS "${resume[@]}"
  mkdir -p "$RES/training/$stage"
  cp "$out"/train_log.jsonl "$out"/loss.png "$RES/training/$stage/" 2>/dev/null || true
  cp "$out"/eval_log.jsonl "$RES/training/$stage/" 2>/dev/null || true
  local sha; sha=$(weights_sha "$out")
  if [ -f "$RES/training/$stage/model.sha256" ] && [ "$(cat "$RES/training/$stage/model.sha256")" != "$sha" ]; then
    echo "[$stage] warning: the trained weights differ from the committed sha256 (training/$stage/model.sha256;" \
      "training is bit-identical only on the same CPU model: see stages.jsonl's cpu);" \
      "the committed runs of this checkpoint will be measured again" >&2
  fi
  echo "$sha" > "$RES/training/$stage/model.sha256"
}

# weights_sha DIR...: one line per checkpoint folder, "<sha256 of its *.safetensors, in name order> <folder name>"
weights_sha() {
  local d
  for d in "$@"; do
    echo "$(cat "$d"/*.safetensors | sha256sum | cut -c1-64) $(basename "$d")"
  done
}

stage_model() {
  [ -f "$MODEL/config.json" ] && [ -f "$RES/conversion.json" ] && { echo "[model] done: $MODEL" >&2; return; }
  log_run model $PY scripts/smollm2.py --check --record "$RES/conversion.json"
}

stage_prompts() {  # chat prompts from the shipped GSM8K and MBPP train splits; held-out eval prompts
  [ -f "$WORK/prompts.jsonl" ] && [ -f "$WORK/eval_prompts.jsonl" ] && { echo "[prompts] done" >&2; return; }
  log_run prompts $PY - "$MODEL" "$WORK" $N_GSM $N_MBPP $EVAL_LIMIT <<'EOF'
"""prompts.jsonl: the first N GSM8K train questions and MBPP's train split (task_id 601-974), as the text of a
user turn (distill --chat wraps them); eval_prompts.jsonl: the next GSM8K train questions, chat-templated,
with their answers (for --eval-every). No test item is used for training."""
import json, os, sys
from transformers import AutoTokenizer
model, work, n_gsm, n_mbpp, n_eval = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
gsm = [json.loads(l) for l in open("tasks/data/gsm8k/train.jsonl")]
mbpp = [r for r in map(json.loads, open("tasks/data/mbpp/mbpp.jsonl")) if 601 <= r["task_id"] <= 974][:n_mbpp]
rows = [{"prompt": r["question"], "source": "gsm8k-train"} for r in gsm[:n_gsm]]
rows += [{"prompt": r["text"] + " Your code should pass these tests:\n\n" + "\n".join(r["test_list"]),
          "source": f"mbpp-train-{r['task_id']}"} for r in mbpp]
tok = AutoTokenizer.from_pretrained(model)
ev = [{"prompt": tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                         add_generation_prompt=True),
       "answer": r["answer"].rsplit("####", 1)[1].strip()} for r in gsm[n_gsm:n_gsm + n_eval]]
for name, recs in (("prompts.jsonl", rows), ("eval_prompts.jsonl", ev)):
    tmp = os.path.join(work, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    os.replace(tmp, os.path.join(work, name))
print(f"{len(rows)} training prompts, {len(ev)} eval prompts")
EOF
}

stage_mask() {  # a mask token for DFlash, TiDAR and block diffusion: an existing, unused special token
  [ -f "$WORK/base-mask/config.json" ] && { echo "[mask] done" >&2; return; }
  log_run mask $PY - "$MODEL" "$WORK/base-mask" <<'EOF'
"""The converted model, unchanged, with its tokenizer's mask token set to `<empty_output>` (id 16), a
StarCoder-era Jupyter token the chat model does not emit (as TiDAR-LM reuses Qwen's `<|fim_pad|>`). No
embedding row is added, so the vocabulary, the weights and greedy `ar` stay the original model's: every
drafter and diffusion model is measured against the same `ar`."""
import os, shutil, sys
from transformers import AutoTokenizer
src, out = sys.argv[1:3]
tok = AutoTokenizer.from_pretrained(src)
tok.add_special_tokens({"mask_token": "<empty_output>"})
assert tok.mask_token_id == 16 and len(tok) == 49152, (tok.mask_token_id, len(tok))
tmp = out + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
for f in os.listdir(src):
    if not f.startswith("tokenizer") and f != "chat_template.jinja":
        shutil.copy(os.path.join(src, f), tmp)
tok.save_pretrained(tmp)
os.replace(tmp, out)
print(f"{out}: mask token <empty_output> = {tok.mask_token_id}, vocab {len(tok)} (unchanged)")
EOF
}

stage_distill() {  # in chunks, so a killed distill loses one chunk at most
  local d=$WORK/distill
  [ -f "$WORK/distilled.jsonl" ] && { echo "[distill] done" >&2; return; }
  if [ -f "$RES/distilled.jsonl" ]; then  # distilled on an earlier machine (same model, prompts, command)
    cp "$RES/distilled.jsonl" "$WORK/.distilled.tmp" && mv "$WORK/.distilled.tmp" "$WORK/distilled.jsonl"
    echo "[distill] done earlier: $RES/distilled.jsonl copied (its commands are in $LOG)" >&2; return
  fi
  mkdir -p "$d"
  split -d -a 4 -l $CHUNK --additional-suffix=.jsonl "$WORK/prompts.jsonl" "$d/prompts-"
  for p in "$d"/prompts-[0-9]*.jsonl; do
    local o=$d/out-${p##*-}
    [ -f "$o" ] || log_run distill $TB distill --model "$MODEL" --prompts "$p" --chat --out "$o" \
      --max-new-tokens $DISTILL_TOKENS --batch-size $DISTILL_BATCH --device cpu --dtype float32
  done
  cat "$d"/out-*.jsonl > "$WORK/.distilled.tmp" && mv "$WORK/.distilled.tmp" "$WORK/distilled.jsonl"
  cp "$WORK/distilled.jsonl" "$RES/.distilled.tmp" && mv "$RES/.distilled.tmp" "$RES/distilled.jsonl"
}

stage_eagle() {
  train eagle "$WORK/eagle" $TB train eagle --target "$MODEL" --data "$WORK/distilled.jsonl" --form eagle3 \
    --draft-vocab-size 8192 --ttt-steps 3 --seq-len $SEQ --batch-size $E_BATCH --steps $E_STEPS --lr 3e-4 --device cpu
}

stage_dflash() {
  train dflash "$WORK/dflash" $TB train dflash --target "$WORK/base-mask" --data "$WORK/distilled.jsonl" --block-size 8 \
    --num-layers 2 --seq-len $SEQ --batch-size $D_BATCH --steps $D_STEPS --lr 3e-4 --device cpu --dtype float32
}

stage_tidar() {
  train tidar "$WORK/tidar" $TB train tidar --base "$WORK/base-mask" --data "$WORK/distilled.jsonl" --block-size 8 --alpha 1 \
    --seq-len $SEQ --batch-size $T_BATCH --steps $T_STEPS --lr 1e-4 --device cpu --dtype float32
}

stage_bd() {
  train bd "$WORK/bd" $TB train block-diffusion --base "$WORK/base-mask" --data "$WORK/distilled.jsonl" --block-size 8 \
    --seq-len $SEQ --batch-size $B_BATCH --steps $B_STEPS --lr 1e-4 --device cpu --dtype float32
}

# one_run NAME CHECKPOINTS TB-RUN-ARGS...: a `tidar-bench run` into $WORK/runs/NAME, skipped unless NAME is in
# --runs (when given); CHECKPOINTS (comma-separated folders) are the weights it measures. A finished run
# is kept in $RES/runs/NAME with its cache and those weights' sha256; on a machine without the cache, that
# cache is reused when the sha256 match (the run then decodes nothing), else the run is measured again.
one_run() {
  local name=$1 ckpts=${2//,/ }; shift 2
  if [ -n "$RUNS" ] && [[ " $RUNS " != *" $name "* ]]; then return; fi
  local work=$WORK/runs/$name res=$RES/runs/$name sha
  # shellcheck disable=SC2086
  sha=$(weights_sha $ckpts)
  if [ ! -d "$work/cache" ] && [ -d "$res/cache" ]; then
    if [ "$sha" = "$(cat "$res/checkpoints.sha256" 2>/dev/null)" ]; then
      mkdir -p "$work" && cp -r "$res/cache" "$res/run_spec.json" "$work/" && echo "[run] $name: finished earlier, its cache reused" >&2
    else
      echo "[run] $name: the committed run measured other weights (runs/$name/checkpoints.sha256): measuring again" >&2
    fi
  fi
  log_run run $TB run "$@" --out "$work"
  rm -rf "$res.tmp" && mkdir -p "$res.tmp"  # the tables, provenance, per-item samples and cache: the lossless check per item
  cp "$work"/summary.csv "$work"/run.json "$work"/run_spec.json "$work"/results_*.json "$work"/samples_*.jsonl "$res.tmp/" 2>/dev/null || true
  cp -r "$work/cache" "$res.tmp/" && echo "$sha" > "$res.tmp/checkpoints.sha256"
  rm -rf "$res" && mv "$res.tmp" "$res"
}

# measure NAME LIMIT TASK [OPTION...]: one `tidar-bench run` per checkpoint (each against its own ar)
measure() {
  local name=$1 limit=$2 task=$3; shift 3
  local common=(--tasks "$task" --limit "$limit" --device cpu --dtype float32 --seed 0 "${RUN_ARGS[@]}" "$@")
  one_run "${name}_base" "$MODEL,$WORK/eagle,$WORK/dflash" --model "$MODEL" --draft "$WORK/eagle" \
    --decoders "ar,hf,eagle,dflash(draft=$WORK/dflash)" "${common[@]}"
  one_run "${name}_tidar" "$WORK/tidar" --model "$WORK/tidar" --decoders "ar,tidar(max_blocks=3)" "${common[@]}"
  one_run "${name}_bd" "$WORK/bd" --model "$WORK/bd" --decoders "ar,bd" "${common[@]}"
}

stage_run() {
  # gsm8k: 5-shot, as a multi-turn chat (the instruct model's template); humaneval: plain completion of the
  # function (humaneval_instruct's chat made this 135M model stop after a token or two in the smoke run).
  # The smoke leaves gsm8k out: its 5-shot chat prefills take minutes per decoder eager on a shared CPU.
  if [ $MODE = full ]; then measure gsm8k $GSM_LIMIT gsm8k --apply-chat-template; fi
  measure humaneval $HE_LIMIT humaneval --allow-code-exec
}

stage_profile() {
  local tnfe
  tnfe=$($PY -c "import csv,sys; r=[x for x in csv.DictReader(open(sys.argv[1])) if x['decoder'].startswith('tidar') and x['tokens_per_nfe']]; print(f\"8={float(r[0]['tokens_per_nfe']):.3f}\" if r else '')" \
    "$(ls -d "$WORK"/runs/{gsm8k,humaneval}_tidar 2>/dev/null | head -1)/summary.csv")
  rm -rf "$RES/latency"
  log_run profile $TB profile-latency --model "$MODEL" --context $CONTEXTS --mask tidar --block-size 8 \
    --repeats $REPEATS --device cpu --dtype float32 "${PROFILE_ARGS[@]}" ${tnfe:+--tnfe $tnfe} --out "$RES/latency"
}

stage_plot() {
  rm -rf "$RES/figures"
  local lat=("$RES/latency")
  for t in gsm8k humaneval; do
    compgen -G "$RES/runs/${t}_*" > /dev/null || continue
    log_run plot $TB plot "$RES"/runs/${t}_* "${lat[@]}" --together --out "$RES/figures/$t"
    lat=()  # the latency figure once
  done
}

stage_report() {  # results.md: every table of the README's results, generated from the files above
  log_run report $PY scripts/smollm2_report.py --res "$RES"
}

started=""
for s in $STAGES; do
  if [ -n "$ONLY" ] && [ "$s" != "$ONLY" ]; then continue; fi
  if [ -n "$FROM" ] && [ -z "$started" ] && [ "$s" != "$FROM" ]; then continue; fi
  started=1
  "stage_$s"
done
echo "done: $MODE stages in $WORK, results in $RES" >&2
