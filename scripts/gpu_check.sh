#!/usr/bin/env bash
# Every GPU check, on a lent GPU machine (docs/performance.md, "GPU"), in two calls of the device tool,
# because the embedded model's GGUF (98 MB) is larger than what one call may carry (64 MiB):
#
#   bash scripts/gpu_check.sh prepare        # here: split the GGUF into .gpu_model/part_a and part_b, and
#                                            # download the wheels the machine lacks into .whl
#   bash scripts/gpu_check.sh kernels tests  # call 1, carrying .whl and .gpu_model/part_a: the Triton kernels'
#                                            # CUDA tests (the wired KIVI/Mustafar paths and the CUDA graphs'
#                                            # capture included), their microbenchmarks (scripts/triton_bench.py,
#                                            # docs/kernels.md) and the engine's CUDA tests; keeps part_a in /tmp
#   bash scripts/gpu_check.sh bench          # call 2, at once, carrying .whl and .gpu_model/part_b: joins the
#                                            # GGUF and runs the real model's benchmarks against transformers
#
# `bench` also times plain decoding of the embedded model with the static step as CUDA graphs, through
# torch.compile and eager, beside transformers' generate (scripts/gpu_profile.py --json: the >= 2x bar).
#
# .whl/ holds the gguf and constriction wheels (the machine cannot reach PyPI; it has the rest, duckdb aside,
# which no check here needs). Results go under $OUT.
set -uo pipefail
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [ "${1:-}" = prepare ]; then
    src=$(.venv/bin/python -c "from workbench.models.embedded import embedded_gguf_path; print(embedded_gguf_path())")
    mkdir -p .gpu_model
    head -c 56000000 "$src" > .gpu_model/part_a
    tail -c +56000001 "$src" > .gpu_model/part_b
    version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl gguf=="$(version gguf)" constriction=="$(version constriction)"
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
# kernels/, store/ and apps/ install as subpackages of workbench (pyproject's package-dir); from the bare
# source tree that the device gets, links give the same import paths.
for sub in kernels store apps; do [ -e workbench/$sub ] || ln -s ../$sub workbench/$sub; done
workbench() { python3 -m workbench.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

[ $# -gt 0 ] || set -- usage
for mode in "$@"; do
case "$mode" in
kernels)
    python3 -c "import triton; print('triton', triton.__version__)" || exit 1
    python3 -m pytest -q -p no:cacheprovider -o timeout=120 tests/test_triton_cuda.py tests/test_kernel_dispatch.py 2>&1 \
        | tee "$OUT/triton_cuda_tests.txt" | tail -15
    timeout 240 python3 scripts/triton_bench.py --json "$OUT/triton_kernels_gpu.json" 2>&1 | tee "$OUT/triton_bench.txt"
    ;;
tests)
    mkdir -p /tmp/wbmodel && cp .gpu_model/part_a /tmp/wbmodel/part_a
    python3 -m pytest -q -p no:cacheprovider -o timeout=120 tests/test_cuda.py tests/test_cuda_matrix.py 2>&1 | tee "$OUT/cuda_tests.txt" | tail -25
    ;;
bench)
    [ -f /tmp/wbmodel/part_a ] || { echo "part_a is gone (a fresh machine): run 'tests' first"; exit 1; }
    cat /tmp/wbmodel/part_a .gpu_model/part_b > /tmp/wbmodel/$GGUF
    echo "$SHA256  /tmp/wbmodel/$GGUF" | sha256sum -c - || exit 1
    model=/tmp/wbmodel/$GGUF
    # first, where a plain step's time goes (launches, copies, syncs per token) beside transformers
    python3 scripts/gpu_profile.py --model $model --device cuda --tokens 128 --rounds 3 \
        --json "$OUT/decode_graphs_gpu.json" 2>&1 | grep -v "it/s" | tee "$OUT/profile_gpu.txt" | tail -60
    workbench bench --model $model --device cuda --peers transformers --peer-dtypes bfloat16 --prompts 4 \
        --repeats 1 --no-store \
        --json "$OUT/baseline_gpu.json" 2>&1 | grep -v "bench:" | tail -12
    workbench bench --model $model --device cuda --no-store --per-category 1 --max-new-tokens 128 \
        --decode prompt_lookup --decode token_recycling \
        --decode lookahead --peers transformers-pld \
        --json "$OUT/suite_gpu.json" --plot "$OUT/suite_gpu.png" 2>&1 | grep -v "bench:" | tail -30
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare | kernels tests | bench"; exit 2
    ;;
esac
done
