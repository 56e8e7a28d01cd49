#!/usr/bin/env bash
# Every GPU figure in ONE device call, planned to end within 9 minutes; the headline first.
#
#   benchmarks/gpu_check.sh --prepare       here, without a GPU: copy the GPU machine's wheels into .whl/
#                                           and the car-turn clip into .gpu_data/ (both git-ignored)
#   device run:  command "bash benchmarks/gpu_check.sh", carry [".whl", ".gpu_data"], timeout_s 600
#   benchmarks/gpu_check.sh --dry-run [--out DIR]   the same parts with tiny settings on the CPU (CI)
#
# On the GPU machine (Python 3.12, torch 2.11, Triton 3.6, no registry) it installs the carried wheels
# into /tmp/site and the project in editable mode, then runs each part under its own `timeout`, in
# order of importance, within a total budget (GPU_CHECK_BUDGET seconds, default 530): a part that no
# longer fits is skipped and said so. As soon as a part ends, its folder (log + results) is appended
# to $OUT/gpu_check.tar and $OUT/summary.md is rewritten, so a hang loses only that part.
#
# Parts: versions (nvidia-smi, torch, triton, device) | the headline: bench_edit image 512x768,
# reference and fast ms/step in one process, cold-cache compile, graphs and recompiles
# (TORCH_LOGS=recompiles in its log), warm-cache start | kernel tests on the GPU (TRITON_INTERPRET=0)
# | profile of steady fast steps | the ablations (torch kernels, CUDA graphs on) | bench_kernels at
# the pipeline's shapes | bench_edit video 70x768x432 | bench_atlas (car-turn, 70 frames 768x432)
# | bench_variants (1, 4, 8 variants together) | bench_batch. The dry run adds compile_plan: the same
# compile plan at the real shapes (aot_eager, narrow widths), its graph count and what that lets the
# GPU's cold compile cost at worst.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
MODE=gpu
DRY_OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) MODE=prepare ;;
        --dry-run) MODE=dry ;;
        --out) DRY_OUT=$2; shift ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

SHARED=${T2L_SHARED:-$REPO/../shared}
CLIP_DIR=car-turn

if [ "$MODE" = prepare ]; then
    mkdir -p .whl .gpu_data
    for w in open_clip_torch ftfy wcwidth madgrad av; do
        cp "$SHARED"/wheels-gpu/${w}-*.whl .whl/ || { echo "gpu_check: no $w wheel in $SHARED/wheels-gpu" >&2; exit 1; }
    done
    rm -rf ".gpu_data/$CLIP_DIR"
    cp -r "$SHARED/data/videos/$CLIP_DIR" ".gpu_data/$CLIP_DIR"
    du -sh .whl .gpu_data
    echo 'now: device run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=600)'
    exit 0
fi

START=$(date +%s)
if [ "$MODE" = gpu ]; then
    : "${OUT:?gpu_check: OUT is not set (the device tool sets it; use --dry-run here)}"
    BUDGET=${GPU_CHECK_BUDGET:-530}
    WORK=/tmp/gpu_check
    PY=python3
    export TRITON_INTERPRET=0
    export TORCH_LOGS=recompiles # every recompile and its reason in the part's log
else
    OUT=${DRY_OUT:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
    BUDGET=${GPU_CHECK_BUDGET:-1200}
    WORK=$(mktemp -d /tmp/gpu_check_work.XXXXXX)
    PY=python
    export TRITON_INTERPRET=1  # the kernel part runs in the Triton interpreter
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny work: one thread is faster, above all on a busy CPU
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$OUT" "$WORK"
rm -f "$OUT/gpu_check.tar"
SUMMARY=$WORK/summary.md
{
    echo "# gpu_check ($MODE), started $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s"
    echo
    echo "| part | status | seconds | limit |"
    echo "|---|---|---:|---:|"
} >"$SUMMARY"

publish() { cp "$SUMMARY" "$OUT/summary.md"; }

# part NAME LIMIT_S MIN_S COMMAND: run COMMAND (bash, with $P = the part's folder) under `timeout`.
part() {
    local name=$1 limit=$2 min=$3 cmd=$4
    local dir=$WORK/$name left t0 rc status
    mkdir -p "$dir"
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$min" ]; then
        echo "SKIPPED: ${left}s of the budget left, the part needs at least ${min}s" >"$dir/log"
        echo "| $name | skipped (budget) | 0 | $limit |" >>"$SUMMARY"
    else
        [ "$limit" -gt "$left" ] && limit=$left
        t0=$(date +%s)
        echo "== $name (limit ${limit}s)"
        P=$dir timeout -k 10 "$limit" bash -c "$cmd" >"$dir/log" 2>&1
        rc=$?
        case $rc in
            0) status=ok ;;
            124 | 137) status="TIMEOUT" ;;
            *) status="FAILED rc=$rc" ;;
        esac
        echo "| $name | $status | $(($(date +%s) - t0)) | $limit |" >>"$SUMMARY"
        tail -n 4 "$dir/log"
    fi
    tar -rf "$OUT/gpu_check.tar" -C "$WORK" "$name" # packed now: a later hang cannot lose it
    publish
}

# -- set-up ------------------------------------------------------------------------------------------
if [ "$MODE" = gpu ]; then
    setup=$WORK/setup
    mkdir -p "$setup"
    {
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
        if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
            ! python3 -c "import t2l_fast.kernels"; then
            # Fallback: a source copy with the kernels where the package expects them; -P keeps the
            # repository's own t2l_fast/ (without kernels/) off the front of sys.path.
            rm -rf /tmp/src && mkdir -p /tmp/src && cp -r t2l_fast /tmp/src/ && cp -r kernels /tmp/src/t2l_fast/kernels
            echo "editable install failed: using the /tmp/src copy"
        fi
    } >"$setup/log" 2>&1
    export PYTHONPATH=/tmp/site
    if [ -d /tmp/src ]; then
        export PYTHONPATH=/tmp/src:/tmp/site:$REPO
        PY="python3 -P"
    fi
    $PY -c "import t2l_fast.kernels, open_clip, madgrad, av; print('imports ok')" >>"$setup/log" 2>&1 ||
        echo "| setup | FAILED (see setup/log) | | |" >>"$SUMMARY"
    tar -rf "$OUT/gpu_check.tar" -C "$WORK" setup
    publish
    VIDEO=$REPO/.gpu_data/$CLIP_DIR
    export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache # empty: the first compile is a cold-cache one
else
    VIDEO=$SHARED/data/videos/$CLIP_DIR
    [ -d "$VIDEO" ] || VIDEO=$REPO/.gpu_data/$CLIP_DIR
    export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache
fi
export PY VIDEO

# -- the parts, most important first -------------------------------------------------------------------
VERSIONS='(nvidia-smi || echo "no nvidia-smi"); $PY -c "
import platform, torch, triton
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(\"device\", p.name, \"SMs\", p.multi_processor_count, \"memory GiB\", round(p.total_memory / 2**30, 1), \"cc\", torch.cuda.get_device_capability(0))
else:
    print(\"device: no CUDA\")
"'

if [ "$MODE" = gpu ]; then
    part versions 30 5 "$VERSIONS"
    # the headline. Its limit holds the counted graphs' cold compile (compile_plan: <= 4 graphs, all in
    # the first step) at up to 45 s each, the reference and fast timed steps, and the warm start
    part edit_image 240 150 '$PY benchmarks/bench_edit.py --preset image --size 512 --steps 40 --warmup 10 \
        --modes reference,fast --warm-start --cache-dir "$TORCHINDUCTOR_CACHE_DIR" --out "$P"'
    part kernel_tests 100 30 '$PY -m pytest tests/kernels -q -x -p no:cacheprovider'
    part profile_step 60 30 '$PY benchmarks/profile_step.py --preset image --size 512 --warmup 12 --steps 3 --out "$P"'
    part edit_ablation 150 60 '$PY benchmarks/bench_edit.py --preset image --size 512 --steps 30 --warmup 10 \
        --modes fast --kernel-ablation --cudagraphs-ablation --no-flops --out "$P"'
    part bench_kernels 80 30 '$PY benchmarks/bench_kernels.py --shapes pipeline --dtype bf16 --out "$P"'
    part edit_video 90 45 '$PY benchmarks/bench_edit.py --preset video --steps 30 --warmup 10 --modes reference,fast \
        --cache-dir "$TORCHINDUCTOR_CACHE_DIR" --out "$P"'
    part bench_atlas 90 40 '$PY benchmarks/bench_atlas.py --video "$VIDEO" --frames 70 --size 768x432 --iterations 500,2000 --out "$P"'
    part bench_variants 90 45 '$PY benchmarks/bench_variants.py --ns 1,4,8 --steps 15 --out "$P"'
    if [ -f benchmarks/bench_batch.py ]; then
        part bench_batch 90 45 '$PY benchmarks/bench_batch.py --jobs 2 --steps 10 --nproc 1 --out "$P"'
    fi
else
    part versions 30 5 "$VERSIONS"
    # the GPU's compile at the real shapes, narrow widths, aot_eager: graphs, and the worst case they allow
    part compile_plan 400 10 '$PY benchmarks/compile_plan.py --steps 3 --profile-steps 1 --out "$P"'
    part edit_image 150 10 '$PY benchmarks/bench_edit.py --smoke --no-flops --warm-start \
        --cache-dir "$TORCHINDUCTOR_CACHE_DIR" --out "$P"'
    part kernel_tests 120 10 '$PY -m pytest tests/kernels/test_composite.py -q -x -p no:cacheprovider'
    part profile_step 60 10 '$PY benchmarks/profile_step.py --smoke --out "$P"'
    part edit_ablation 150 10 '$PY benchmarks/bench_edit.py --smoke --no-flops --modes fast --kernel-ablation \
        --cudagraphs-ablation --out "$P"'
    part bench_kernels 60 10 '$PY benchmarks/bench_kernels.py --smoke --out "$P"'
    part edit_video 90 10 '$PY benchmarks/bench_edit.py --preset video --smoke --no-flops --modes fast --out "$P"'
    if [ -d "$VIDEO" ]; then
        part bench_atlas 90 10 '$PY benchmarks/bench_atlas.py --video "$VIDEO" --device cpu --frames 3 --size 96x54 \
            --iterations 10 --threads 1 --out "$P"'
    else
        echo "| bench_atlas | skipped (no $CLIP_DIR clip here) | 0 | 0 |" >>"$SUMMARY"
        publish
    fi
    part bench_variants 90 10 '$PY benchmarks/bench_variants.py --smoke --out "$P"'
    if [ -f benchmarks/bench_batch.py ]; then
        # its --reduced run is long for a CI budget and has its own test: here only the invocation
        part bench_batch 60 10 '$PY benchmarks/bench_batch.py --help'
    fi
fi

{
    echo
    echo "total $(($(date +%s) - START))s of a ${BUDGET}s budget; logs and results in gpu_check.tar (one folder per part)"
} >>"$SUMMARY"
publish
cat "$SUMMARY"
