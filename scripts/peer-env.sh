#!/usr/bin/env bash
# The optional peer environment for the neural-tangents comparison (about 3.6 GB, ~2 minutes).
# Usage: bash scripts/peer-env.sh [DIR]   (default DIR: .venv-peers). The benchmarks find it through NEURALPATH_PEER_PYTHON
# or at .venv-peers/bin/python, and skip the comparison cleanly when it is absent.
set -euo pipefail
DIR="${1:-.venv-peers}"
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q 'jax==0.4.23' 'jaxlib==0.4.23' 'numpy<2' 'ml-dtypes==0.5.1' tensorflow-cpu 'neural-tangents==0.6.5'
"$DIR/bin/python" -c "import neural_tangents, jax; print('neural-tangents', neural_tangents.__version__, 'jax', jax.__version__)"
