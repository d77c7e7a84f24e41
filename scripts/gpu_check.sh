#!/usr/bin/env bash
# Every GPU check in one run on a lent GPU machine (see docs/performance.md): the CUDA tests, the
# engine and agreement tests on CUDA, and plain decoding speed against transformers.
# Needs the gguf wheel carried in .whl/ (the machine cannot reach PyPI); writes results under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py tests/test_agreement.py tests/test_lossless.py tests/test_speculative.py \
    -m "not integration" 2>&1 | tail -5
python3 scripts/gpu_speed.py --out "$OUT/gpu_speed.json"
