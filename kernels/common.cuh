// Shared helpers of ferry's kernels. NVRTC compiles each kernel file with this
// header prepended (see src/lib.rs). It includes no CUDA header: NVRTC from
// the PyPI wheel ships none, and the GPU machine's toolkit then needs no
// include paths either.

typedef unsigned int u32;
typedef unsigned long long u64;

// bfloat16 as its bits; converted by hand (round to nearest even, NaN kept).
typedef unsigned short bf16;

#define F32_INF __int_as_float(0x7f800000)
#define F32_MAX 3.402823466e38f

__device__ __forceinline__ float bf16_to_f32(bf16 x) {
    return __uint_as_float(((u32)x) << 16);
}

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (bf16)((b >> 16) | 0x40);  // quiet NaN
    b += 0x7fffu + ((b >> 16) & 1u);
    return (bf16)(b >> 16);
}

// Sum over a warp (all 32 lanes take part).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `scratch` holds 32 floats of shared memory.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : -F32_INF;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// The sampler's one random source, the same function as the engine's
// `rng::draw_bits` (engine/src/rng.rs), bit for bit: 64 bits that depend only
// on a sequence's seed, its output position (tokens it has generated so far)
// and a sub-draw index (0: the token draw). SplitMix64's output function,
// keyed three times. Counter-based: no state is kept on the device, and a
// sequence draws the same whatever batch, rank or resumption it runs in.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 draw_bits(u64 seed, u64 position, u64 sub) {
    u64 h = mix64(seed ^ 0x9E3779B97F4A7C15ull);
    h = mix64(h ^ (position * 0xD1B54A32D192ED03ull));
    return mix64(h ^ (sub * 0xAEF17502108EF2D9ull));
}

// draw_bits as a uniform in [0, 1) with 53 random bits (rng::draw_unit).
__device__ __forceinline__ double draw_unit(u64 seed, u64 position, u64 sub) {
    return (double)(draw_bits(seed, position, sub) >> 11) * (1.0 / 9007199254740992.0);
}
