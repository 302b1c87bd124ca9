// Not CUDA: just enough of its names for g++ to parse and type-check
// kernels_check.cu (with the `<<<...>>>` launch brackets removed) on a machine
// without nvcc, so a slip in the harness shows before device time is spent.
// Used only by scripts/gpu-check-prepare.sh; nothing here runs.
#pragma once
#include <cmath>
#include <cstddef>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define cudaSuccess 0
#define cudaMemcpyHostToDevice 1
#define cudaMemcpyDeviceToHost 2
typedef int cudaError_t;
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
struct cudaDeviceProp { char name[256]; int major, minor, multiProcessorCount; };
inline const char* cudaGetErrorString(cudaError_t) { return ""; }
template <class T> cudaError_t cudaMalloc(T**, size_t) { return 0; }
inline cudaError_t cudaMemcpy(void*, const void*, size_t, int) { return 0; }
inline cudaError_t cudaMemset(void*, int, size_t) { return 0; }
inline cudaError_t cudaFree(void*) { return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaDeviceSynchronize() { return 0; }
inline cudaError_t cudaGetDeviceCount(int*) { return 0; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp*, int) { return 0; }
inline void __syncthreads() {}
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline float __int_as_float(int) { return 0; }
inline float __uint_as_float(unsigned) { return 0; }
inline unsigned __float_as_uint(float) { return 0; }
inline float __expf(float x) { return std::exp(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float rsqrtf(float x) { return 1 / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
