// RMSNorm fused with the residual add, one row per block:
//   residual[r] += add[r]   (when add is not null; the new residual is kept)
//   out[r] = residual[r] / sqrt(mean(residual[r]^2) + eps) * weight
// Sums in f32 over the bf16 values. hidden need not be a multiple of the block.
extern "C" __global__ void fused_add_rmsnorm_bf16(
    bf16* __restrict__ residual, const bf16* __restrict__ add,
    const bf16* __restrict__ weight, bf16* __restrict__ out,
    int hidden, float eps) {
    __shared__ float scratch[32];
    size_t row = (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float x = bf16_to_f32(residual[row + i]);
        if (add != nullptr) {
            x += bf16_to_f32(add[row + i]);
            residual[row + i] = f32_to_bf16(x);
        }
        ss += x * x;
    }
    float total = block_sum(ss, scratch);
    float inv = rsqrtf(total / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float x = bf16_to_f32(residual[row + i]);
        out[row + i] = f32_to_bf16(x * inv * bf16_to_f32(weight[i]));
    }
}
