"""Build the reduced FlashAttention-3 extension that segquant_torchao.fa3_attention calls (``torch.ops.flash_attn_3``):
the forward kernel only, head dim 128, bf16 and e4m3, for sm_90a (H100 / H200). FlashAttention-3 has no wheel and
its full build compiles hundreds of kernels; this one compiles four sources (about 1.5 minutes on 16 cores with
nvcc 13.0) into a ~3 MB library.

Sources (not shipped here): FlashAttention's ``hopper/`` folder (Dao-AILab/flash-attention, measured at commit
0251105a2fb1) and CUTLASS's ``include/`` (its ``csrc/cutlass`` submodule, commit 7127592069c2), as a folder or a
``.tar.xz`` holding ``include/``. Needs torch with CUDA, nvcc 12.3 or newer, ninja and Python's headers.

    python benchmarks/fa3_build.py --hopper flash-attention/hopper --cutlass cutlass_include.tar.xz --out build/
    python benchmarks/attention_bench.py --out DIR --fa3-library build/_C.so
    python benchmarks/speed.py --out DIR --variants bf16,segquant_fp8_static_fp8attn --fa3-library build/_C.so
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from pathlib import Path

# every FlashAttention-3 feature that FLUX-style attention (no mask, one length, head dim 128) does not use
DISABLED = ("BACKWARD", "PAGEDKV", "SPLIT", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "VARLEN", "CLUSTER",
            "HDIM64", "HDIM96", "HDIM192", "HDIM256", "SM8x", "HDIMDIFF64", "HDIMDIFF192")
INSTANTIATIONS = ("flash_fwd_hdim128_bf16_sm90.cu", "flash_fwd_hdim128_e4m3_sm90.cu")
# FlashAttention-3's own nvcc flags (hopper/setup.py), less -lineinfo and --resource-usage
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
              "-DCUTLASS_ENABLE_GDC_FOR_SM90", "-DCUTLASS_DEBUG_TRACE_LEVEL=0", "-DNDEBUG",
              "-gencode", "arch=compute_90a,code=sm_90a"]


def cutlass_include(source: Path, work: Path) -> Path:
    """CUTLASS's include folder: ``source`` itself, or ``include/`` unpacked from a ``.tar.xz`` into ``work``."""
    if source.is_dir():
        return source
    with tarfile.open(source) as archive:
        archive.extractall(work / "cutlass", filter="data")
    return work / "cutlass" / "include"


def build(hopper: Path, cutlass: Path, out: Path, jobs: int, nvcc_threads: int) -> Path:
    """Compile and link; returns the library (``out/_C.so``)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    if not torch.cuda.is_available() or CUDA_HOME is None:
        sys.exit("fa3_build.py needs torch with CUDA and the CUDA toolkit (nvcc)")
    sources = [hopper / "flash_api_stable.cpp", hopper / "flash_prepare_scheduler.cu",
               *(hopper / "instantiations" / name for name in INSTANTIATIONS)]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        sys.exit(f"not FlashAttention-3's hopper/ folder: missing {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    include = cutlass_include(cutlass, out)
    cccl = Path(CUDA_HOME) / "include" / "cccl"  # CUDA 13 keeps CCCL's headers there (hopper/setup.py does this)
    for var in ("CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH"):
        os.environ[var] = os.pathsep.join(filter(None, [str(cccl), os.environ.get(var)]))
    os.environ["MAX_JOBS"] = str(jobs)
    features = [f"-DFLASHATTENTION_DISABLE_{name}" for name in DISABLED]
    cxx = ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000", "-DTORCH_TARGET_VERSION=0x0209000000000000"]
    load(name="_C", sources=[str(s) for s in sources], extra_cflags=cxx + features,
         extra_cuda_cflags=["--threads", str(nvcc_threads)] + NVCC_FLAGS + features,
         extra_include_paths=[str(hopper), str(include)], build_directory=str(out), verbose=True,
         is_python_module=False)
    return out / "_C.so"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hopper", type=Path, required=True, help="FlashAttention's hopper/ folder")
    p.add_argument("--cutlass", type=Path, required=True, help="CUTLASS's include/ folder, or a .tar.xz of it")
    p.add_argument("--out", type=Path, required=True, help="build folder; the library is OUT/_C.so")
    p.add_argument("--jobs", type=int, default=4, help="sources compiled at once")
    p.add_argument("--nvcc-threads", type=int, default=4)
    args = p.parse_args()
    if not args.cutlass.exists():
        sys.exit(f"no CUTLASS include folder or archive at {args.cutlass}")
    start = time.perf_counter()
    library = build(args.hopper, args.cutlass, args.out, args.jobs, args.nvcc_threads)
    print(f"built {library} ({library.stat().st_size / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
