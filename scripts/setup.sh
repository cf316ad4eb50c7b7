#!/usr/bin/env bash
# Set-up of a fresh machine: the Debian data package (Fashion-MNIST), this suite with its test
# dependencies, and the two foreign engines (mmsegmentation, detectron2). Safe to run again: it only
# installs what is missing. SKIP_ENGINES=1 leaves out mmsegmentation and detectron2.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist
fi

$PIP -e '.[dev]'
[ "${SKIP_ENGINES:-0}" = 1 ] && exit 0

# mmsegmentation 1.2.2 with pure wheels: mmcv-lite has no compiled ops; the dilated FCN needs none, and
# segmentation/mmseg_engine.py registers a stand-in for the missing `mmcv._ext` (see DEPENDENCIES.md).
$PIP -e '.[segmentation]'

# detectron2 is not on PyPI. pb1-detectron2 0.6 is its v0.6 Python code without the C++ sources: build
# it with no extensions (Faster R-CNN uses torchvision's nms/roi_align). Users who reach GitHub can
# instead: pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2'
$PIP -e '.[detection]'
if ! python -c "import detectron2" >/dev/null 2>&1; then
  work="$(mktemp -d)"
  python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
    -d "$work" pb1-detectron2==0.6
  tar -xzf "$work"/pb1*detectron2-0.6.tar.gz -C "$work"
  src="$(find "$work" -maxdepth 1 -mindepth 1 -type d | head -n1)"
  sed -i 's/ext_modules=get_extensions()/ext_modules=[]/' "$src/setup.py"
  $PIP --no-deps --no-build-isolation "$src"
  rm -rf "$work"
fi
