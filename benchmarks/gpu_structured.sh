#!/usr/bin/env bash
# Launch the channel-pruning runs of issue #4 on one GPU through the main job (`prunekit run
# --device cuda`), detached (setsid), side by side: DSA and the channel-magnitude baseline at 50 %
# FLOPs on ResNet-20/56, PreCropping (SynFlow channel ratios) against unstructured SynFlow at the
# same parameter count, sDprun on VGG-16 beside the channel baseline (ResNet-56: half the epochs). Each writes its report to
# runs/gpu/<name>/. Usage: bash benchmarks/gpu_structured.sh DATA_ROOT [DENSE_EPOCHS] [PRUNE_EPOCHS]
set -u
root=${1:?data root (cifar-10-batches-py)}
ed=${2:-10}
ep=${3:-10}
py=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} \
       MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p runs/gpu
job() {  # name, args...
    local name=$1; shift
    mkdir -p runs/gpu/$name
    setsid nohup $py -m prunekit run --backend torch --device cuda --data-root $root --train-limit all \
        --test-limit all --no-progress --overwrite --out runs/gpu/$name "$@" >runs/gpu/$name/log.txt 2>&1 < /dev/null &
}
job dsa20   --model resnet20 --algorithm dsa --set budget=0.5 --dense-epochs $ed --prune-epochs $ep
job chan20  --model resnet20 --algorithm channel --set keep_ratio=0.5 --dense-epochs $ed --prune-epochs $ep
job dsa56   --model resnet56 --algorithm dsa --set budget=0.5 --dense-epochs $(((ed + 1) / 2)) --prune-epochs $(((ep + 1) / 2))
job chan56  --model resnet56 --algorithm channel --set keep_ratio=0.5 --dense-epochs $(((ed + 1) / 2)) --prune-epochs $(((ep + 1) / 2))
job precrop --model resnet20 --algorithm precrop --sparsity 0.9 --set score=synflow --dense-epochs 0 --prune-epochs $((ed + ep))
job synflow --model resnet20 --algorithm precrop --sparsity 0.9 --set score=synflow --set structure=unstructured --dense-epochs 0 --prune-epochs $((ed + ep))
job sdprun  --model vgg16 --algorithm sdprun --dense-epochs 0 --prune-epochs $((ed + ep))
job chanvgg --model vgg16 --algorithm channel --set keep_ratio=0.5 --dense-epochs $ed --prune-epochs $ep
