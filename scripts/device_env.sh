# Sourced by the device scripts: packages the lent machine's image lacks (carried in .whl/), the
# tokenizer vocab (carried in .carry/tiktoken/), and the NCCL settings the machines require.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
[ -d .carry/tiktoken ] && export TIKTOKEN_ENCODINGS_BASE=$PWD/.carry/tiktoken
export GPT_OSS_CACHE=/tmp/gpt-oss-cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
