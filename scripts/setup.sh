#!/usr/bin/env bash
# Set-up of a fresh machine, then (optionally) one command run inside the set-up environment:
#
#   bash scripts/setup.sh                       # set up only
#   bash scripts/setup.sh tricks demo           # set up, then run `tricks demo` in the environment
#   bash scripts/setup.sh python -m pytest -q   # set up, then the tests
#
# What it installs: the Debian data package (Fashion-MNIST), this suite with its test dependencies, and
# the two foreign engines (mmsegmentation, detectron2). Safe to run again: it only installs what is
# missing.
#
# Python environment: the active virtual environment if there is one ($VIRTUAL_ENV), otherwise the
# project's own `.venv/` (made with `python3 -m venv`; the Debian package python3-venv is installed
# when it is missing). A stock Debian/Ubuntu has no `python` command and an externally managed system
# Python (PEP 668), so nothing is ever installed into the system Python.
#
# Versions: everything is installed with `-c constraints.txt`, the versions the tests last passed with
# (refreshed on purpose: see the file's header). TRICKS_NO_CONSTRAINTS=1 installs without it (the newest
# releases, as pyproject.toml allows). torch is not in the file: a GPU machine keeps its own CUDA build.
#
# SKIP_ENGINES=1 leaves out mmsegmentation and detectron2.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  [ "$apt_updated" = 1 ] || { as_root apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  apt_install dataset-fashion-mnist
fi

# --- the Python environment --------------------------------------------------------------------------
if [ -n "${VIRTUAL_ENV:-}" ]; then
  venv="$VIRTUAL_ENV"
else
  venv="$root/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    command -v python3 >/dev/null 2>&1 || apt_install python3
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      # Debian/Ubuntu split venv + ensurepip into python3-venv (python3.X-venv on some releases).
      pyver="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      apt_install python3-venv || apt_install "python${pyver}-venv"
      python3 -m venv "$venv"
    fi
  fi
fi
export VIRTUAL_ENV="$venv"
export PATH="$venv/bin:$PATH"
hash -r

constraints=(-c "$root/constraints.txt")
[ "${TRICKS_NO_CONSTRAINTS:-0}" = 1 ] && constraints=()
PIP=(python -m pip install -q --disable-pip-version-check "${constraints[@]}")

installed() { python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# pip/setuptools of the venv itself (an old pip cannot read pyproject-only editable installs)
# (Python >= 3.12 venvs come without setuptools, which detectron2's --no-build-isolation build needs.)
python -m pip install -q --disable-pip-version-check "${constraints[@]}" --upgrade pip setuptools wheel
extras="dev"
[ "${SKIP_ENGINES:-0}" = 1 ] || extras="dev,segmentation,detection"
"${PIP[@]}" -e ".[$extras]"

if [ "${SKIP_ENGINES:-0}" != 1 ] && ! installed detectron2; then
  # detectron2 is not on PyPI. pb1-detectron2 0.6 is its v0.6 Python code without the C++ sources: build
  # it with no extensions (Faster R-CNN uses torchvision's nms/roi_align). Users who reach GitHub can
  # instead: pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2'
  # The sdist is fetched from PyPI's files by its pinned hash: pip >= 26 refuses to `pip download` it
  # (its setup.py declares a direct-URL extra, panopticapi, that we never install).
  work="$(mktemp -d)"
  python - "$work/pb1-detectron2-0.6.tar.gz" <<'PY'
import hashlib, sys, urllib.request
url = ("https://files.pythonhosted.org/packages/60/26/48f5bbb7ee492696a21da23303daeecdfe3942c498a70d34108acf63b2bd/"
       "pb1-detectron2-0.6.tar.gz")
sha256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
data = urllib.request.urlopen(url, timeout=120).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"pb1-detectron2-0.6.tar.gz: sha256 mismatch (expected {sha256})")
open(sys.argv[1], "wb").write(data)
PY
  tar -xzf "$work"/pb1-detectron2-0.6.tar.gz -C "$work"
  src="$(find "$work" -maxdepth 1 -mindepth 1 -type d | head -n1)"
  sed -i 's/ext_modules=get_extensions()/ext_modules=[]/' "$src/setup.py"
  "${PIP[@]}" --no-deps --no-build-isolation "$src"
  rm -rf "$work"
fi

# --- the command to run in the environment --------------------------------------------------------------
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
