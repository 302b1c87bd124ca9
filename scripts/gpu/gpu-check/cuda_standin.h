// Not CUDA: just enough of its names for g++ to parse and type-check
// kernels_check.cu (with the `<<<...>>>` launch brackets removed) on a machine
// without nvcc, so a slip in the harness shows before device time is spent.
// Used by scripts/gpu/gpu-check-prepare.sh, which also builds kernels_check.cu
// with -DFERRY_HOST_EMULATION: memory is host memory, and the sampling
// kernel and the draw run on the CPU, each block as EMULATED_THREADS
// std::threads (two warps) that meet at __syncthreads and exchange warp
// shuffles through shared slots, so the kernels' block-wide logic (chunks,
// reductions, prefix counts) runs as it would on a GPU, only with fewer threads.
#pragma once
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdlib>
#include <cstring>
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
static dim3 blockIdx, blockDim, gridDim;
static thread_local dim3 threadIdx;
struct cudaDeviceProp { char name[256]; int major, minor, multiProcessorCount; };
inline const char* cudaGetErrorString(cudaError_t) { return ""; }
template <class T> cudaError_t cudaMalloc(T** p, size_t n) { *p = (T*)std::malloc(n); return 0; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, int) { std::memcpy(d, s, n); return 0; }
inline cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return 0; }
inline cudaError_t cudaFree(void* p) { std::free(p); return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaDeviceSynchronize() { return 0; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 0; return 0; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) { std::strcpy(p->name, "host emulation"); p->major = p->minor = p->multiProcessorCount = 0; return 0; }
#ifdef FERRY_HOST_EMULATION
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
#define EMULATED_THREADS 64
struct EmuBarrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned n = 0, waiting = 0, generation = 0;
    void wait() {
        std::unique_lock<std::mutex> lk(m);
        unsigned g = generation;
        if (++waiting == n) { waiting = 0; generation++; cv.notify_all(); return; }
        cv.wait(lk, [&] { return g != generation; });
    }
};
static EmuBarrier emu_block, emu_warp[EMULATED_THREADS / 32];
static double emu_slots[EMULATED_THREADS];
inline void __syncthreads() { emu_block.wait(); }
template <class T> T emu_shfl_xor(T v, int o) {
    EmuBarrier& b = emu_warp[threadIdx.x / 32];
    emu_slots[threadIdx.x] = (double)v;
    b.wait();
    T r = (T)emu_slots[threadIdx.x ^ o];
    b.wait();
    return r;
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_shfl_xor(v, o); }
inline double __shfl_xor_sync(unsigned, double v, int o) { return emu_shfl_xor(v, o); }
// Runs `f` as one block of EMULATED_THREADS threads.
template <class F> void emu_block_run(F f) {
    blockDim.x = EMULATED_THREADS;
    emu_block.n = EMULATED_THREADS;
    for (auto& w : emu_warp) w.n = 32;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < EMULATED_THREADS; t++) ts.emplace_back([t, &f] { threadIdx.x = t; f(); });
    for (auto& t : ts) t.join();
}
#else
inline void __syncthreads() {}
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline double __shfl_xor_sync(unsigned, double v, int) { return v; }
#endif
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float x) { return std::exp(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float rsqrtf(float x) { return 1 / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }

