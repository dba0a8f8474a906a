#!/usr/bin/env bash
# Build what scripts/bench_gpu.py needs on a GPU machine that has CUDA, cuDNN, PyTorch and
# Python 3.12 but CPU-only onnxruntime and no package registry: onnxruntime-gpu, our dependencies
# that such an image lacks, wrk (with its LuaJIT) and py-spy, as one xz archive split into parts
# small enough to carry one per call.
#
#   bash scripts/gpu_pack.sh [OUT_DIR=.gpu] [PARTS=4]
#
# Writes OUT_DIR/p1 ... OUT_DIR/pN (one part each; add OUT_DIR to .git/info/exclude). On the GPU
# machine, after copying every part to /tmp/p:
#
#   mkdir -p /tmp/site && cat /tmp/p/pack.part.* | xz -d -T8 | tar -C /tmp/site -xf -
#   export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/_tools:$PATH
#   export LD_LIBRARY_PATH=/tmp/site/_tools:$(python3 -c "import glob,os,site; print(':'.join(sorted({
#     os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + '/nvidia/**/lib*.so*',
#     recursive=True)})))")      # the image's CUDA and cuDNN wheels, for onnxruntime-gpu
#   python3 scripts/bench_gpu.py --profile
#
# Needs .venv (make setup), wrk (scripts/ci_services.sh) and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu}
parts=${2:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_31_x86_64
           --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
pin() { .venv/bin/pip freeze | grep -i "^$1==" ; }

echo "downloading wheels for CPython 3.12 ..."
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$work/wheels" "onnxruntime-gpu==1.31.1" "$(pin bentoml)" "$(pin evidently)" "$(pin orjson)" "$(pin pysimdjson)" \
  "$(pin pydantic)" "$(pin pydantic-settings)" "$(pin starlette)" "$(pin uvicorn)" "$(pin pandas)" 'numpy<2.5'

# What the CUDA image already has (its package list, device/KINDS.md of the tool library):
# installing our own copy of these would only shadow a working one. pandas is kept: the image's
# is 3.x, and Evidently 0.7 needs pandas < 3.
present='absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build
certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock flatbuffers fonttools
frozenlist fsspec grpcio h11 httpcore httpx idna jinja2 joblib kiwisolver markdown-it-py markupsafe
matplotlib mdurl ml-dtypes mpmath multidict narwhals networkx numpy nvidia-ml-py onnx onnxruntime packaging
pillow pip pluggy prometheus-client propcache protobuf psutil pyarrow pygments pyparsing python-dateutil
pyyaml regex requests rich scikit-learn scipy setuptools shellingham six statsmodels sympy threadpoolctl
tqdm typer typing-extensions typing-inspect urllib3 uvloop wheel wrapt yarl zipp patsy'
mkdir -p "$work/keep"
for whl in "$work"/wheels/*.whl; do
  name=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  grep -qw -- "$name" <<<"$present" || cp "$whl" "$work/keep/"
done
echo "installing $(find "$work/keep" -name "*.whl" | wc -l) wheels into the pack ..."
.venv/bin/pip install -q --target "$work/site" --no-deps --no-compile --python-version 3.12 --implementation cp \
  --only-binary=:all: "${platforms[@]}" "$work"/keep/*.whl

mkdir -p "$work/site/_tools"
cp "$(command -v wrk)" "$work/site/_tools/"
cp -L "$(ldd "$(command -v wrk)" | awk '/libluajit/ {print $3}')" "$work/site/_tools/"
[ -x .venv/bin/py-spy ] && cp .venv/bin/py-spy "$work/site/_tools/" || echo "no .venv/bin/py-spy: --profile will be skipped"

echo "compressing $(du -sh "$work/site" | cut -f1) with xz (a few minutes) ..."
tar -C "$work/site" -cf - . | xz -T0 -8 > "$work/pack.tar.xz"
rm -rf "${out:?}"/p[0-9]*
mkdir -p "$out"
(cd "$work" && split -n "$parts" -d -a 2 pack.tar.xz pack.part.)
i=1
for part in "$work"/pack.part.*; do
  mkdir -p "$out/p$i" && mv "$part" "$out/p$i/"
  i=$((i + 1))
done
ls -l "$out"/p*/
echo "carry one of $out/p1 ... $out/p$parts per call and copy it to /tmp/p there"
