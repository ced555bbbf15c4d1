#!/usr/bin/env bash
# One prepared, resumable GPU session of benchmarks/nnunet_label_efficiency.py (issue 23):
# nnU-Net 2d fine-tuning on CHAOS T2 from random init, MoCo and MoCo + LRC pre-training, with
# k = 1, 2, 4 labelled patients, on the Evidence II split (benchmarks/results/README.md).
#
# nnU-Net's wheels and the data do not fit one device call (64 MiB with the repository), so a
# session is two calls, the second within the machine's 30 s of warmth after the first:
#
# Here (no GPU), once, from the repository root (.gpu_nnunet* are ignored by git):
#   bash benchmarks/gpu_nnunet_session.sh prepare
# (copies the 16 CHAOS patients that data/chaos-t2-demo does not ship, about 35 MB; builds
# and downloads nnU-Net's wheels for the device's Python 3.12, SimpleITK apart.) Then with
# the device tool:
#   run(command="bash benchmarks/gpu_nnunet_session.sh install", carry=[".gpu_nnunet_sitk"],
#       timeout_s=120)
#   run(command="bash benchmarks/gpu_nnunet_session.sh run", carry=[".gpu_nnunet"],
#       timeout_s=570)
# and, here, unpack what comes back from the repository root and commit it:
#   tar -xzf FILES_AT/nnunet_gpu_session.tgz
# (run files under benchmarks/results/nnunet_label_efficiency_runs/, the table
# benchmarks/results/nnunet_label_efficiency_2d_gpu.{md,json}). Run files are keyed by the
# options, so every lent session resumes the same protocol (SEEDS adds seeds), and
#   bash benchmarks/gpu_nnunet_session.sh report
# rebuilds the table here from the committed run files.
#
# The settings are sized by estimate to end inside BENCH_SECONDS (480 s) on one H200, not
# measured: pre-training 300 steps per arm, nnU-Net 5 epochs x 50 iterations per run. A run
# cut by the time limit is dropped and redone by the next session; finished runs stay.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED="${SHARED:-../shared/data/chaos-t2}"
SEEDS="${SEEDS:-0}"
OPTIONS=(--configuration 2d --arms random moco moco_lrc --ks 1 2 4 --pretrain-steps 300
         --epochs 5 --iterations-per-epoch 50 --val-iterations 10 --precision bf16-mixed
         --tag _gpu)
PLATFORMS=(--only-binary=:all: --python-version 3.12 --implementation cp
           --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)

case "${1:-}" in
prepare)
    rm -rf .gpu_nnunet .gpu_nnunet_sitk
    data=.gpu_nnunet/chaos-t2
    mkdir -p "$data/imagesTr" "$data/labelsTr" .gpu_nnunet/whl .gpu_nnunet_sitk
    cp "$SHARED/dataset.json" "$data/"
    for image in "$SHARED"/imagesTr/*.nii.gz; do
        name=$(basename "$image")
        # The patients shipped in data/chaos-t2-demo travel with the repository already.
        if ! cmp -s "$image" "data/chaos-t2-demo/imagesTr/$name" ||
            ! cmp -s "$SHARED/labelsTr/$name" "data/chaos-t2-demo/labelsTr/$name"; then
            cp "$image" "$data/imagesTr/"
            cp "$SHARED/labelsTr/$name" "$data/labelsTr/"
        fi
    done
    # Pure-Python packages (some are published as source only): wheels built here.
    python3 -m pip wheel -q --no-deps -w .gpu_nnunet/whl nnunetv2==2.8.1 \
        dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
        acvl-utils==0.2.6 nibabel==5.4.2
    python3 -m pip download -q --no-deps "${PLATFORMS[@]}" -d .gpu_nnunet/whl blosc2==4.14.1 \
        ndindex==1.10.1 numexpr==2.14.2 connected-components-3d==4.1.1
    python3 -m pip download -q --no-deps "${PLATFORMS[@]}" -d .gpu_nnunet_sitk SimpleITK==2.5.7
    du -sh .gpu_nnunet .gpu_nnunet_sitk
    ;;
install)  # on the device, first call: SimpleITK alone fills most of a call
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu_nnunet_sitk/*.whl
    echo "SimpleITK installed in /tmp/site: now the 'run' call, within 30 s"
    ;;
run)  # on the device, second call
    if [ ! -d /tmp/site/SimpleITK ]; then
        echo "no /tmp/site/SimpleITK on this machine (a fresh one?): call 'install' first" >&2
        exit 3
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .gpu_nnunet/whl/*.whl
    export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
    data=/tmp/chaos-t2  # the shipped demo patients and the carried ones, linked together
    mkdir -p "$data/imagesTr" "$data/labelsTr"
    cp .gpu_nnunet/chaos-t2/dataset.json "$data/"
    for kind in imagesTr labelsTr; do
        ln -sf "$PWD"/data/chaos-t2-demo/$kind/*.nii.gz "$PWD"/.gpu_nnunet/chaos-t2/$kind/*.nii.gz \
            "$data/$kind/"
    done
    log="${OUT:-/tmp}/nnunet_gpu_session.log"
    set +e
    timeout "${BENCH_SECONDS:-480}" python3 benchmarks/nnunet_label_efficiency.py \
        --data "$data" --out benchmarks/results --work-dir /tmp/nnunet_bench --device cuda \
        --seeds $SEEDS --processes 8 --da-processes 12 --pretrain-workers 8 "${OPTIONS[@]}" \
        2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" -eq 0 ] || echo "stopped (status $status: time limit or signal): rerun to resume"
    if [ -n "${OUT:-}" ]; then  # at most 8 files come back: the results as one archive
        mkdir -p benchmarks/results/nnunet_label_efficiency_runs
        tar -czf "$OUT/nnunet_gpu_session.tgz" benchmarks/results/nnunet_label_efficiency_runs \
            $(ls benchmarks/results/nnunet_label_efficiency_2d_gpu.* 2>/dev/null)
    fi
    nvidia-smi --query-gpu=name,memory.used --format=csv || true
    ;;
report)  # here (PYTHON: the project's Python): the table from the committed run files
    "${PYTHON:-python3}" benchmarks/nnunet_label_efficiency.py --data "$SHARED" --out benchmarks/results \
        --seeds $SEEDS "${OPTIONS[@]}" --report-only
    ;;
*)
    echo "usage: bash benchmarks/gpu_nnunet_session.sh prepare|install|run|report" >&2
    exit 2
    ;;
esac
