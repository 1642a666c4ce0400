// The tinykern op schemas, defined once. Each device registers its kernels in
// csrc/<device>/ with TORCH_LIBRARY_IMPL; fake kernels live in tinykern/kernels/native.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(tinykern, m) {
  // blocks [..., nb*144] uint8 -> [..., nb*256] of dtype
  m.def("q4k_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  // x [M, K] @ dequant(w [N, nb*144]).T (+ bias [N]) -> [M, N] in x.dtype.
  // K <= nb*256: weight columns past K are row padding and never meet x.
  // exact=False lets the CPU kernels round x, the weight, bias and output to bf16 for M >= 256
  // on AMX (fp32 accumulation); exact=True keeps every product in fp32.
  m.def("q4k_matmul(Tensor x, Tensor w, Tensor? bias, bool exact=True) -> Tensor");
  // blocks [..., nb*34] uint8 -> [..., nb*32] of dtype
  // x float32 [..., K] -> blocks uint8 [..., K/256*144]: GGML's reference quantizer, byte for byte
  m.def("q4k_quantize(Tensor x) -> Tensor");
  // x float32 [..., K] -> blocks uint8 [..., K/32*34]
  m.def("q8_0_quantize(Tensor x) -> Tensor");
  m.def("q8_0_dequantize(Tensor blocks, ScalarType dtype) -> Tensor");
  m.def("q8_0_matmul(Tensor x, Tensor w, Tensor? bias, bool exact=True) -> Tensor");
  // Every GGML block format by its GGML type id (tinykern.formats.FORMATS[name].ggml_type; the
  // per-format pieces are csrc/cpu/formats.h and csrc/cuda/formats.cuh). Same contracts as the
  // q4k_* ops above; block_quantize is GGML's reference quantizer, byte for byte, where the
  // format has one here (the CPU only).
  m.def("block_dequantize(Tensor blocks, int ggml_type, ScalarType dtype) -> Tensor");
  m.def("block_matmul(Tensor x, Tensor w, Tensor? bias, int ggml_type, bool exact=True) -> Tensor");
  m.def("block_quantize(Tensor x, int ggml_type) -> Tensor");
  // x [N, D], codebooks [L, K, D] float32 -> (codes [N, L] int64, quantized [N, D] float32)
  m.def("rvq_encode(Tensor x, Tensor codebooks) -> (Tensor, Tensor)");
  // codes [N, L'] int32/int64 (-1 adds nothing), codebooks [L, K, D] -> [N, D] in codebooks.dtype
  m.def("rvq_decode(Tensor codes, Tensor codebooks) -> Tensor");
}

// What this build can do at run time; the compile flags are in tinykern/_build_info.json.
static PyObject* runtime_info(PyObject*, PyObject*) {
#ifdef _OPENMP
  PyObject* openmp = Py_True;
  int threads = omp_get_max_threads();
#else
  PyObject* openmp = Py_False;
  int threads = 1;
#endif
#ifdef TINYKERN_WITH_CUDA
  PyObject* cuda = Py_True;
#else
  PyObject* cuda = Py_False;
#endif
  PyObject* bf16_gemm = tinykern::cpu::has_bf16_gemm() ? Py_True : Py_False;
  return Py_BuildValue("{s:s,s:O,s:i,s:O,s:O}", "simd", tinykern::cpu::simd_level(), "openmp", openmp,
                       "openmp_threads", threads, "cuda", cuda, "bf16_gemm", bf16_gemm);
}

static PyMethodDef methods[] = {
    {"runtime_info", runtime_info, METH_NOARGS, "SIMD level, OpenMP and CUDA of this build."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
