"""Builds tinykern._C from csrc/.

CUDA sources are compiled whenever torch is a CUDA build and nvcc is found, GPU visible or not;
otherwise only the CPU kernels. TINYKERN_NO_EXT=1 gives a pure-Python install. MAX_JOBS and
TORCH_CUDA_ARCH_LIST are honoured (the arch list defaults to sm_80, sm_89 and sm_90).
"""

import glob
import json
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0"


def extension_build():
    if os.environ.get("TINYKERN_NO_EXT") == "1":
        return {}, {}
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("TINYKERN_NO_CUDA") == "1":
        with_cuda = False
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No contraction of a*b+c into an FMA: the quantizers reproduce GGML's reference bit for bit.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
    macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("TINYKERN_WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension
    else:
        extension = cpp_extension.CppExtension
    ext = extension(
        "tinykern._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    record_build_info(
        torch=torch.__version__,
        cuda=torch.version.cuda if with_cuda else None,
        cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        cxx_flags=" ".join(cxx),
        nvcc_flags=" ".join(nvcc) if with_cuda else None,
        machine=platform.machine(),
        max_jobs=os.environ.get("MAX_JOBS"),
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return {"ext_modules": [ext]}, {"build_ext": build_ext}


def _find_cuda_home():
    # torch takes CUDA_HOME as the grandparent of `which nvcc`; where nvcc is a wrapper or link
    # such as /usr/local/bin/nvcc that is /usr/local, which has no libcudart to link against.
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


def record_build_info(**info):
    # Read back by `python -m tinykern info`: the flags this copy of _C was built with.
    with open(os.path.join(ROOT, "tinykern", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)


ext_kwargs, cmdclass = extension_build()
setup(cmdclass=cmdclass, **ext_kwargs)
