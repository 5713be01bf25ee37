#!/usr/bin/env bash
# Launch the full-length CIFAR-10 GPU runs of benchmarks/gpu_cifar.py side by side on one GPU,
# detached (setsid) so they outlive the launching command; each checkpoints every epoch and
# resumes if started again. Usage: bash benchmarks/gpu_runs.sh DATA_ROOT (a cifar-10-batches-py folder) [EPOCHS_TRP] [EPOCHS_SPARSE]
#   status: tail -n1 runs/gpu/*/log.txt        results: runs/gpu/*/result.json
set -u
root=${1:?data root with train.zip/test.zip}
e_trp=${2:-164}
e_sparse=${3:-80}
py=${PYTHON:-python3}
# several runs share the machine's cores: one BLAS/OpenMP thread each, or their spinning threads
# starve every run's Python (seen: magnitude runs slowed from 4.8 to 13 s an epoch)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} \
       MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-1}
mkdir -p runs/gpu
launch() {  # name, args...; with COMPILE=1: torch.compile first, eager from the last checkpoint if that fails
    local name=$1; shift
    mkdir -p runs/gpu/$name
    local cmd="$py benchmarks/gpu_cifar.py $* --data-root $root --out runs/gpu/$name"
    if [ "${COMPILE:-0}" = 1 ]; then cmd="$py benchmarks/gpu_cifar.py --compile $* --data-root $root --out runs/gpu/$name || $cmd"; fi
    setsid nohup bash -c "$cmd" >runs/gpu/$name/log.txt 2>&1 < /dev/null &
}
launch trp       --algorithm trp --epochs $e_trp --lr-schedule step --wd 1e-4
launch mag95     --algorithm magnitude --sparsity 0.95 --epochs $e_sparse
launch rpg95     --algorithm rpg --sparsity 0.95 --epochs $e_sparse
launch mag99     --algorithm magnitude --sparsity 0.99 --epochs $e_sparse
launch rpg99     --algorithm rpg --sparsity 0.99 --epochs $e_sparse
