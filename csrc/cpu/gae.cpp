// Generalised advantage estimation on the CPU: for each sequence of a (batch, steps) batch, one loop
// backwards over time carrying the next valid step's value and advantage,
//
//     delta_t = r_t + gamma V_next - V_t,   A_t = delta_t + gamma lam A_next,   returns_t = A_t + V_t,
//
// skipping masked steps (they output 0 and leave the carry alone), so right padding ends a sequence.
// Sequences are independent and split across threads with at::parallel_for; within one the recurrence is
// serial, T dependent steps of a few flops. Arithmetic in at::opmath_type (fp32, fp64 for fp64 input).
// Memory traffic: read 2 B T values + B T mask bytes, write 2 B T values, each element once.
#include "fastllm.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace fastllm {
namespace {

// Sequences per thread task: enough steps that a task outweighs the cost of scheduling it.
constexpr int64_t kMinStepsPerTask = 1 << 15;

template <typename scalar_t>
void gae_kernel(const scalar_t* rewards, const scalar_t* values, const bool* mask, int64_t batch, int64_t steps,
                double gamma, double lam, scalar_t* advantages, scalar_t* returns) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t discount = static_cast<acc_t>(gamma);
  const acc_t trace = static_cast<acc_t>(gamma * lam);
  const int64_t grain = std::max<int64_t>(1, kMinStepsPerTask / std::max<int64_t>(steps, 1));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * steps;
      acc_t next_value = 0, next_advantage = 0;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t i = row + t;
        if (!mask[i]) {  // padding may hold anything (NaN too): it is never read into the carry
          advantages[i] = scalar_t(0);
          returns[i] = scalar_t(0);
          continue;
        }
        const acc_t value = static_cast<acc_t>(values[i]);
        const acc_t delta = static_cast<acc_t>(rewards[i]) + discount * next_value - value;
        const acc_t advantage = delta + trace * next_advantage;
        advantages[i] = static_cast<scalar_t>(advantage);
        returns[i] = static_cast<scalar_t>(advantage + value);
        next_value = value;
        next_advantage = advantage;
      }
    }
  });
}

void check_steps_matrix(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "gae_forward: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, "gae_forward: ", name, " must be 2-D (batch, steps), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "gae_forward: ", name, " must be contiguous, got strides ", t.strides());
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> gae_forward(const torch::Tensor& rewards, const torch::Tensor& values,
                                                     const torch::Tensor& mask, double gamma, double lam) {
  check_steps_matrix(rewards, "rewards");
  check_steps_matrix(values, "values");
  check_steps_matrix(mask, "mask");
  TORCH_CHECK(rewards.sizes() == values.sizes() && mask.sizes() == values.sizes(),
              "gae_forward: rewards, values and mask must have one shape, got ", rewards.sizes(), ", ",
              values.sizes(), " and ", mask.sizes());
  TORCH_CHECK(rewards.scalar_type() == values.scalar_type(), "gae_forward: rewards and values must have one dtype, got ",
              rewards.scalar_type(), " and ", values.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae_forward: mask must be bool, got ", mask.scalar_type());
  auto advantages = torch::empty_like(values);
  auto returns = torch::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "gae_forward", [&] {
    gae_kernel<scalar_t>(rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), mask.data_ptr<bool>(),
                         values.size(0), values.size(1), gamma, lam, advantages.data_ptr<scalar_t>(),
                         returns.data_ptr<scalar_t>());
  });
  return {advantages, returns};
}

}  // namespace fastllm
