#!/usr/bin/env bash
# retnet-hf on a CUDA machine (one H100 or H200), in one run of at most 10 minutes (GPU_CHECK_DEADLINE=570 s).
# Five steps, each with its own log and time limit, the next one running whatever the last gave; all into $OUT
# (default ./gpu_check_out), where summary.md lists each step's status and seconds and repeats the results:
#   1 install  .venv-gpu: torch==$GPU_CHECK_TORCH (2.13.0, the index's CUDA wheel), -e .[train,dev],
#              flash-linear-attention 0.6.0 (uv where the index has it). No index reachable: the machine's
#              python3 with the wheels of .whl/ (--fetch-wheels). Then env.md (versions, GPU) and nvidia-smi.txt
#   2 checks   benchmarks.gpu_check: forms, cache, bfloat16, fla backend vs torch backend   -> checks/
#   3 train    benchmarks.prefill: training step tokens/s and peak memory, 2k and 16k tokens -> train/
#   4 decode   benchmarks.decode: tokens/s at 512-16k tokens of context, eager and compiled  -> decode/
#   5 vllm     tests/vllm_plugin under vLLM 0.32 in .venv-gpu-vllm (installed in the background during 2-4)
# Usage: [OUT=dir] bash scripts/gpu_check.sh [--dry-run] [--pack] [--fetch-wheels]
#   --dry-run       on a CPU (under a minute on 2 cores): no installs, $GPU_CHECK_PYTHON (default python), tiny
#                   CPU runs of steps 2-4, step 5 lists its tests; tests/benchmarks/test_gpu_check.py runs it
#   --pack          $OUT holds only summary.md and gpu_check.tar.gz (everything), both refreshed after each step
#   --fetch-wheels  (here, with an index) download into .whl/ the wheels step 1 installs where there is none
# GPU_CHECK_STEPS picks steps ("install checks train decode vllm"); GPU_CHECK_BUDGET_<STEP> sets a step's
# seconds, GPU_CHECK_<STEP>_ARGS adds arguments to its python command (e.g. GPU_CHECK_DECODE_ARGS).
set -uo pipefail
SCRIPT=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
REPO=$(dirname "$(dirname "$SCRIPT")")
CALLER_DIR=$PWD
cd "$REPO" || exit 1

STEP_NAMES="install checks train decode vllm"
TRAIN_VARIANTS="RetNet chunkwise,RetNet chunkwise (fla),Llama SDPA,Llama FlashAttention-2,fla RetNet"
export GPU_CHECK_VENV=${GPU_CHECK_VENV:-$REPO/.venv-gpu} GPU_CHECK_VLLM_VENV=${GPU_CHECK_VLLM_VENV:-$REPO/.venv-gpu-vllm}
export GPU_CHECK_WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl} GPU_CHECK_TORCH=${GPU_CHECK_TORCH:-2.13.0}
FLA_PACKAGES="flash-linear-attention==0.6.0 fla-core==0.6.0"
VLLM_PACKAGE="vllm==0.32.*"  # the releases the plugin supports: retnet_hf/vllm_plugin SUPPORTED_VLLM
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STATE=$GPU_CHECK_VENV/gpu_check.env  # what step 1 chose (PY, PYTHONPATH, MODE), for later steps and later runs

log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# ------------------------------------------------------------------------------------------------ install helpers
installer() {  # installer VENV ARGS...: uv where the venv has it (pip's index settings passed on), else pip
    local venv=$1
    shift
    if [ -x "$venv/bin/uv" ]; then
        local cfg
        for cfg in index-url extra-index-url find-links constraint; do
            local value
            value=$("$venv/bin/python" -m pip config get "global.$cfg" 2>/dev/null || true)
            case $cfg in
            index-url) [ -n "${PIP_INDEX_URL:-$value}" ] && export UV_INDEX_URL=${PIP_INDEX_URL:-$value} ;;
            extra-index-url) [ -n "${PIP_EXTRA_INDEX_URL:-$value}" ] && export UV_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL:-$value} ;;
            find-links) [ -n "${PIP_FIND_LINKS:-$value}" ] && export UV_FIND_LINKS=${PIP_FIND_LINKS:-$value} ;;
            constraint) [ -n "${PIP_CONSTRAINT:-$value}" ] && export UV_CONSTRAINT=${PIP_CONSTRAINT:-$value} ;;
            esac
        done
        # as pip: the best match over every index, not only the first one that has the package
        UV_INDEX_STRATEGY=unsafe-best-match "$venv/bin/uv" pip install -q --python "$venv/bin/python" "$@" && return 0
        echo "uv failed; pip instead"
    fi
    "$venv/bin/python" -m pip install -q "$@"
}

make_venv() {  # make_venv DIR: a venv (kept from an earlier run), with uv if the index has it (GPU_CHECK_UV=0: not)
    [ -x "$1/bin/python" ] || "$BASE_PY" -m venv "$1" || return 1
    [ "${GPU_CHECK_UV:-1}" = 0 ] || "$1/bin/python" -m pip install -q uv || echo "no uv: pip installs"
}

index_reachable() {
    local scratch rc
    scratch=$(mktemp -d)
    timeout 40 "$BASE_PY" -m pip download -q --retries 1 --timeout 15 --no-deps -d "$scratch" uv >/dev/null 2>&1
    rc=$?
    rm -rf "$scratch"
    return $rc
}

step_vllm_install() {  # step 5's install, in the background from step 2 on: vLLM's GPU build and the package
    make_venv "$GPU_CHECK_VLLM_VENV" && installer "$GPU_CHECK_VLLM_VENV" "$VLLM_PACKAGE" -e ".[vllm,train,dev]"
}

# ------------------------------------------------------------------------------------------------------ the steps
step_install() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "dry run: no install; python: $PY ($(command -v "$PY"))"
        echo "would install into $GPU_CHECK_VENV: torch==$GPU_CHECK_TORCH, -e .[train,dev], $FLA_PACKAGES einops"
    elif index_reachable; then
        echo "package index reachable: $GPU_CHECK_VENV from $BASE_PY"
        make_venv "$GPU_CHECK_VENV" || return 1
        installer "$GPU_CHECK_VENV" "torch==$GPU_CHECK_TORCH" || return 1
        installer "$GPU_CHECK_VENV" -e ".[train,dev]" || return 1
        # --no-deps: torch keeps the triton it came with
        # shellcheck disable=SC2086
        installer "$GPU_CHECK_VENV" --no-deps $FLA_PACKAGES || return 1
        installer "$GPU_CHECK_VENV" einops || return 1
        printf 'MODE=online\nPY=%q\nPYTHONPATH=\n' "$GPU_CHECK_VENV/bin/python" >"$STATE"
    else
        echo "no package index reachable: the machine's $BASE_PY ($(command -v "$BASE_PY")), the repository on"
        echo "PYTHONPATH, and the wheels of $GPU_CHECK_WHEELS (carried; bash scripts/gpu_check.sh --fetch-wheels)"
        mkdir -p "$GPU_CHECK_VENV/site"
        if compgen -G "$GPU_CHECK_WHEELS/*.whl" >/dev/null; then
            "$BASE_PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$GPU_CHECK_VENV/site" \
                "$GPU_CHECK_WHEELS"/*.whl || return 1
            ls "$GPU_CHECK_VENV/site"
        else
            echo "no wheels in $GPU_CHECK_WHEELS: flash-linear-attention is missing unless $BASE_PY has it"
        fi
        printf 'MODE=offline\nPY=%q\nPYTHONPATH=%q\n' "$(command -v "$BASE_PY")" "$GPU_CHECK_VENV/site:$REPO" >"$STATE"
    fi
    # shellcheck source=/dev/null
    [ "$DRY_RUN" = 1 ] || . "$STATE"
    export PYTHONPATH
    [ "$DRY_RUN" = 1 ] || "$PY" -m pip freeze 2>/dev/null | grep -i -E '^(torch|triton|transformers|flash|fla|vllm|einops)'
    "$PY" -m benchmarks.gpu_check env --out "$RES" || return 1
    if command -v nvidia-smi >/dev/null; then nvidia-smi >"$RES/nvidia-smi.txt" 2>&1; else echo "no nvidia-smi"; fi
    [ "$DRY_RUN" = 1 ] || "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
}

step_checks() {
    if [ "$DRY_RUN" = 1 ]; then set -- --device cpu --quick; else set -- --device cuda; fi
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.gpu_check check "$@" --out "$RES/checks" ${GPU_CHECK_CHECKS_ARGS:-}
}

step_train() {
    if [ "$DRY_RUN" = 1 ]; then
        set -- --quick --device cpu --lengths 32 --repeats 1 --bandwidth-mb 16
    else
        set -- --size 125m --device cuda --dtype bfloat16 --lengths 2k,16k --repeats 3 --bandwidth-mb 1024
    fi
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.prefill "$@" --batch-size 1 --modes forward+backward --variants "$TRAIN_VARIANTS" \
        --out "$RES/train" ${GPU_CHECK_TRAIN_ARGS:-}
}

step_decode() {
    if [ "$DRY_RUN" = 1 ]; then
        set -- --quick --device cpu --contexts 32 --new-tokens 4 --repeats 1 --bandwidth-mb 16 --compile-backend eager
    else
        set -- --size 125m --device cuda --dtype bfloat16 --contexts 512,2k,8k,16k --new-tokens 32 --repeats 3 \
            --bandwidth-mb 1024
    fi
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.decode "$@" --batch-sizes 1 --paths step,generate,compiled --out "$RES/decode" \
        ${GPU_CHECK_DECODE_ARGS:-}
}

step_vllm() {
    local supported
    supported=$(sed -n 's/^SUPPORTED_VLLM = (\(.*\))$/\1/p' retnet_hf/vllm_plugin/__init__.py | tr -d '", ')
    echo "vLLM: the plugin supports $supported.x only (SUPPORTED_VLLM) and refuses other releases by name (0.33 and"
    echo "later run only vLLM's V2 model runner, not yet checked), so $VLLM_PACKAGE is what runs here."
    if [ "$DRY_RUN" = 1 ]; then  # (pytest would import vLLM, which is not here: the tests' names instead)
        echo "dry run: would install $VLLM_PACKAGE -e .[vllm,train,dev] into $GPU_CHECK_VLLM_VENV and run:"
        "$PY" -c 'import ast, sys
for path in sys.argv[1:]:
    tree = ast.parse(open(path).read())
    tests = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    assert tests, path
    print(path + ": " + str(len(tests)) + " tests: " + ", ".join(tests))' tests/vllm_plugin/test_*.py
        return
    fi
    if [ "$MODE" != online ]; then
        echo "no package index reachable, and vLLM (with its own torch) is too large to carry"
        return 3
    fi
    if [ ! -f "$RES/.vllm-install.started" ]; then  # step 1 did not run in this call: install now
        step_vllm_install >"$RES/vllm-install.log" 2>&1
        echo $? >"$RES/.vllm-install.rc"
    fi
    while [ ! -f "$RES/.vllm-install.rc" ]; do sleep 2; done
    if [ "$(cat "$RES/.vllm-install.rc")" != 0 ]; then
        echo "the vLLM install failed (rc $(cat "$RES/.vllm-install.rc")); vllm-install.log:"
        tail -n 30 "$RES/vllm-install.log"
        return 1
    fi
    "$GPU_CHECK_VLLM_VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
    PYTHONPATH='' "$GPU_CHECK_VLLM_VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/vllm_plugin
}

fetch_wheels() {  # here: the wheels step 1 installs where no index is reachable (python 3.12, x86-64): fla, and
    # GPU_CHECK_WHEEL_PACKAGES (e.g. a newer transformers with the huggingface_hub and kernels it needs)
    local py=${GPU_CHECK_PYTHON:-python}
    mkdir -p "$GPU_CHECK_WHEELS"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    # shellcheck disable=SC2086
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU_CHECK_WHEELS" $FLA_PACKAGES ${GPU_CHECK_WHEEL_PACKAGES:-}
    ls -la "$GPU_CHECK_WHEELS"
    echo "carry .whl to the GPU machine (the device tool: carry=['.whl'])"
}

# ----------------------------------------------------------------------------------------------------- one step
if [ "${1:-}" = __step ]; then  # bash gpu_check.sh __step NAME: one step, run by the loop below under timeout
    # shellcheck source=/dev/null
    if [ -f "$STATE" ] && [ "$DRY_RUN" != 1 ]; then . "$STATE"; fi
    export PYTHONPATH=${PYTHONPATH:-}
    "step_$2"
    exit $?
fi

# ------------------------------------------------------------------------------------------------------ the run
export DRY_RUN=0 PACK=0
for arg in "$@"; do
    case $arg in
    --dry-run) DRY_RUN=1 ;;
    --pack) PACK=1 ;;
    --fetch-wheels) fetch_wheels; exit $? ;;
    -h | --help) sed -n '2,/^set -uo/p' "$SCRIPT" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (--dry-run, --pack, --fetch-wheels)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-./gpu_check_out}
case $OUT in /*) ;; *) OUT=$CALLER_DIR/$OUT ;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ "$PACK" = 1 ]; then  # the results gather in a folder of their own, removed at the end; $OUT gets the tarball
    RES=$(mktemp -d)/gpu_check
    trap 'rm -rf "$(dirname "$RES")"' EXIT
else
    RES=$OUT
fi
mkdir -p "$RES"
export RES OUT BASE_PY=${GPU_CHECK_BASE_PYTHON:-python3} PY=${GPU_CHECK_PYTHON:-python} MODE=dry-run
if [ "$DRY_RUN" != 1 ]; then  # later steps take PY from step 1 (STATE), or without it from GPU_CHECK_PYTHON or python3
    PY=${GPU_CHECK_PYTHON:-$BASE_PY} MODE="not installed (GPU_CHECK_PYTHON)"
    # shellcheck source=/dev/null
    [ ! -f "$STATE" ] || MODE=$(. "$STATE" && echo "$MODE (step 1 of an earlier run)")
fi
export VLLM_PACKAGE FLA_PACKAGES TRAIN_VARIANTS STATE
rm -f "$RES/.vllm-install.rc" "$RES/.vllm-install.started"
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-570}
STEPS=${GPU_CHECK_STEPS:-$STEP_NAMES}
declare -A BUDGET=([install]=150 [checks]=90 [train]=120 [decode]=200 [vllm]=240)
: >"$RES/.steps"
VLLM_PID=""

write_summary() {
    local gpu
    gpu=$(sed -n 's/^- GPU 0: //p' "$RES/env.md" 2>/dev/null)
    {
        echo "# GPU check of retnet-hf"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), GPU: ${gpu:-none}; mode: $MODE$([ "$DRY_RUN" = 1 ] && echo ' (dry run: CPU, tiny sizes)');" \
            "git $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo '+changes'); $(($(date +%s) - START)) s so far"
        echo
        echo "| step | status | seconds | limit s | log |"
        echo "|---|---|---|---|---|"
        while IFS=$'\t' read -r name status seconds limit; do
            echo "| $name | $status | $seconds | $limit | $name.log |"
        done <"$RES/.steps"
        echo
        echo "vLLM: the plugin supports 0.32 only (SUPPORTED_VLLM; 0.33+ run only the V2 model runner), so step 5 runs $VLLM_PACKAGE."
        for part in env.md checks/gpu_check.md train/prefill.md decode/decode.md; do
            [ -f "$RES/$part" ] && { echo; echo "## $part"; echo; sed 's/^# /### /' "$RES/$part"; }
        done
        while IFS=$'\t' read -r name status _; do  # the end of the log of each step that did not pass
            case $status in ok | skipped*) [ "$name" != vllm ] && continue ;; esac
            echo; echo "## $name.log (end)"; echo; echo '```'; tail -n 20 "$RES/$name.log"; echo '```'
        done <"$RES/.steps"
    } >"$RES/summary.md"
    if [ "$PACK" = 1 ]; then
        cp "$RES/summary.md" "$OUT/summary.md"
        tar -czf "$OUT/.gpu_check.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")" && mv "$OUT/.gpu_check.tar.gz" "$OUT/gpu_check.tar.gz"
    fi
}

for name in $STEP_NAMES; do
    case " $STEPS " in *" $name "*) ;; *) continue ;; esac
    left=$((DEADLINE - ($(date +%s) - START) - 10))
    limit=${BUDGET[$name]}
    override="GPU_CHECK_BUDGET_${name^^}"
    limit=${!override:-$limit}
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped: no time left\t0\t%s\n' "$name" "$limit" >>"$RES/.steps"
        log "$name: skipped, no time left"
        continue
    fi
    log "$name: start (limit $limit s)"
    started=$(date +%s)
    timeout --kill-after=10 "$limit" bash "$SCRIPT" __step "$name" >"$RES/$name.log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - started))
    case $rc in
    0) status=ok ;;
    3) status="skipped: $(tail -n 1 "$RES/$name.log")" ;;
    124 | 137) status="TIMEOUT after $limit s" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$limit" >>"$RES/.steps"
    log "$name: $status ($seconds s)"
    if [ "$name" = install ] && [ "$DRY_RUN" != 1 ] && [ -f "$STATE" ]; then
        # shellcheck source=/dev/null
        MODE=$(. "$STATE" && echo "$MODE")
        if [ "$MODE" = online ] && [[ " $STEPS " == *" vllm "* ]]; then  # vLLM installs while steps 2-4 run
            touch "$RES/.vllm-install.started"
            # shellcheck disable=SC2016
            setsid bash -c 'nice -n 10 timeout "$1" bash "$2" __step vllm_install; echo $? >"$3"' _ \
                "$((DEADLINE - 60))" "$SCRIPT" "$RES/.vllm-install.rc" >"$RES/vllm-install.log" 2>&1 &
            VLLM_PID=$!
            log "vllm: installing $VLLM_PACKAGE in the background (pid $VLLM_PID, vllm-install.log)"
        fi
    fi
    write_summary
done
if [ -n "$VLLM_PID" ] && kill -0 "$VLLM_PID" 2>/dev/null; then kill -- "-$VLLM_PID" 2>/dev/null; fi
write_summary
log "done in $(($(date +%s) - START)) s: $OUT/summary.md"
cat "$RES/summary.md"
