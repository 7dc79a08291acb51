#!/usr/bin/env bash
# One short run on a lent GPU machine (see README "Speed"): the CUDA test, then the benchmark.
# The machine's image has torch; open_clip and transformers 5.24 travel as wheels in .whl/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
python3 -c "from magic_edu.tools.bench import run_benchmarks; run_benchmarks('${1:-all}', 'cuda', 3, False, memory=False)"  # memory: a CPU figure, keep the GPU run short
