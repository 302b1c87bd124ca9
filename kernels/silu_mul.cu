// SwiGLU's join: out[t, j] = silu(gate_up[t, j]) * gate_up[t, inter + j], with
// gate and up side by side in one row of 2 * inter (one GEMM made both).
// Grid: (ceil(inter / blockDim.x), tokens).
extern "C" __global__ void silu_and_mul_bf16(
    const bf16* __restrict__ gate_up, bf16* __restrict__ out, int inter) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= inter) return;
    size_t t = blockIdx.y;
    float g = bf16_to_f32(gate_up[t * 2 * inter + j]);
    float u = bf16_to_f32(gate_up[t * 2 * inter + inter + j]);
    out[t * inter + j] = f32_to_bf16(g / (1.0f + __expf(-g)) * u);
}
