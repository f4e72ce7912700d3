#!/bin/sh
# The prepared GPU run: one call on a lent card (4.5 minutes on an H100).
# Installs nothing (MONAI, a pure-Python wheel, only if one lies in .whl/). Runs the CUDA
# code paths (pinned uint8 transfers, one batch in flight, IEEE fp32 convolutions,
# autocast, NCCL under torchrun) and the GPU rows of BENCHMARKS.md on the card, most needed
# first; each step has its own time limit so that one hang costs one step, not the run.
#
# Usage: sh bench/gpu.sh [LOG]            (LOG default: gpu.txt; everything goes there too)
# Rehearse the script on a CPU machine:  DEV=cpu SIZE=256 BIG=512 sh bench/gpu.sh /tmp/g.txt
# Some steps only: ONLY="whole-fp32 monai" sh bench/gpu.sh
DEV=${DEV:-cuda}
SIZE=${SIZE:-2048}  # the engine-vs-whole benchmark's photo side
BIG=${BIG:-4096}    # a size that fills a GPU better
LOG=${1:-gpu.txt}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d)
: >"$LOG"
fails=0

step() {  # step SECONDS NAME CMD...: run with a limit, log everything, keep going
    limit=$1 name=$2
    shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac  # ONLY="a b": just those steps
    t0=$(date +%s)
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    [ $rc = 0 ] || fails=$((fails + 1))
    echo "--- $name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

if ls .whl/monai-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$TMP/site" .whl/monai-*.whl >>"$LOG" 2>&1 &&
        export PYTHONPATH="$PYTHONPATH:$TMP/site"
fi

step 30 env sh -c "nvidia-smi -L; $PY -c 'import torch, os; print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0), os.cpu_count(), \"cpus\")'"
step 120 tests $PY -m pytest -q -p no:cacheprovider tests/test_exact.py tests/test_pipeline.py tests/test_png.py
step 60 inspect $PY -m tilerun inspect --device "$DEV"
# The CLI on the card, fp32 and bf16; then under torchrun with NCCL (one GPU: one rank);
# then the same folder on the CPU, to compare the class maps and inpaintings file by file.
step 90 cli-fp32 $PY -m tilerun run sample_images "$TMP/fp32" --device "$DEV"
step 90 cli-bf16 $PY -m tilerun run sample_images "$TMP/bf16" --device "$DEV" --precision bf16
if [ "$DEV" = cuda ]; then
    step 120 torchrun-nccl $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m tilerun run sample_images \
        "$TMP/nccl" --device cuda --backend nccl
    step 30 resume $PY -m tilerun run sample_images "$TMP/fp32" --device cuda
fi
step 120 cli-cpu $PY -m tilerun run sample_images "$TMP/cpu" --device cpu
step 30 compare $PY - "$TMP" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1])
def load(p):
    return np.asarray(Image.open(p)).astype(int)
for other in ("nccl", "bf16", "cpu"):
    for f in sorted((root / "fp32").glob("*.png")):
        g = root / other / f.name
        if not g.exists():
            print(f"{other}: {f.name} missing"); continue
        a, b = load(f), load(g)
        what = "class pixels differing" if ".pred." in f.name else "max grey-level difference"
        v = f"{(a != b).mean():.4%}" if ".pred." in f.name else str(int(np.abs(a - b).max()))
        print(f"fp32 vs {other}: {f.name}: {what} {v}")
EOF
step 150 whole-fp32 $PY bench/engine_vs_whole.py --device "$DEV" --precision fp32 --size "$SIZE" --repeats 5
step 150 whole-bf16 $PY bench/engine_vs_whole.py --device "$DEV" --precision bf16 --size "$SIZE" --repeats 5
step 150 whole-fp32-big $PY bench/engine_vs_whole.py --device "$DEV" --precision fp32 --size "$BIG" --repeats 3 --profile
step 150 whole-bf16-big $PY bench/engine_vs_whole.py --device "$DEV" --precision bf16 --size "$BIG" --repeats 3
# A folder big enough to outweigh a fresh process's CUDA/cuDNN warm-up (2 photos of 2048^2
# held 0.24 s of warm H100 work: python bench/end_to_end.py --device cuda).
step 240 end-to-end $PY bench/end_to_end.py --device "$DEV" --repeats 2 --big "${E2E_BIG:-12}" --size "$BIG" --patch "ENCODERS_GPU = 8; ENCODE_PIXELS = 2**28" --timeline
step 120 host $PY bench/host_probe.py
if [ "$DEV" = cuda ]; then  # a fresh process's warm-up: the first photo alone, then after a blank image
    step 60 first-image sh -c "$PY bench/first_image.py && $PY bench/first_image.py --warm 2048"
fi
step 150 tile-sweep $PY bench/tile_sweep.py --device "$DEV" --size "$BIG" --tiles "${TILES:-512,1024,2048}" --batches "${BATCHES:-1,2,4,8}" --repeats 2
step 90 flops-fp32 $PY bench/flops.py --device "$DEV" --precision fp32 --size "$BIG" --repeats 3
step 90 flops-bf16 $PY bench/flops.py --device "$DEV" --precision bf16 --size "$BIG" --repeats 3
step 120 monai $PY bench/monai_compare.py --device "$DEV" --size "$SIZE" --repeats 3

echo "=== summary ($fails failed steps)" | tee -a "$LOG"
grep -E "^(RATIO|tiled:|tile [0-9]|=== |--- |[0-9]+ passed|FAILED|fp32 vs)|MP/s|Error|error:" "$LOG" | grep -v "^=== " | tail -n 80
rm -rf "$TMP"
[ $fails = 0 ]
