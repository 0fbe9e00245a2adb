// The one pybind11 module of fastllm's CPU ops; the kernels live in cpu/<family>.cpp.
#include "fastllm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastllm CPU kernels";

  // softmax family
  m.def("softmax_forward", &fastllm::softmax_forward, py::arg("x"), py::arg("log"));
  m.def("softmax_backward", &fastllm::softmax_backward, py::arg("dy"), py::arg("y"), py::arg("log"));
  m.def("row_argmax", &fastllm::row_argmax, py::arg("x"));
  m.def("logit_stats_forward", &fastllm::logit_stats_forward, py::arg("x"), py::arg("labels"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("want_sum"), py::arg("want_entropy"));
  m.def("logit_stats_backward", &fastllm::logit_stats_backward, py::arg("x"), py::arg("labels"),
        py::arg("lse"), py::arg("a"), py::arg("b"), py::arg("c"), py::arg("d"), py::arg("inv_temperature"),
        py::arg("out") = py::none());
  m.def("wide_matmul_available", &fastllm::wide_matmul_available, py::arg("dtype"));
  m.def("wide_addmm_", &fastllm::wide_addmm_, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("beta"));

  // norm family
  m.def("norm_forward", &fastllm::norm_forward, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("offset"), py::arg("rms"));
  m.def("norm_backward", &fastllm::norm_backward, py::arg("dy"), py::arg("d_residual_out"), py::arg("h"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("offset"), py::arg("rms"),
        py::arg("want_weight_grad"), py::arg("want_bias_grad"));

  // attention family
  m.def("set_streaming_store_threshold", &fastllm::set_streaming_store_threshold, py::arg("bytes"));
  m.def("set_attention_gemm", &fastllm::set_attention_gemm, py::arg("engine"));
  m.def("attention_forward", &fastllm::attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"));
  m.def("attention_dense", &fastllm::attention_dense, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("kv_lengths"), py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"));
  m.def("attention_backward", &fastllm::attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dlse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("softmax_scale"), py::arg("window_left"), py::arg("window_right"));

  // gae family
  m.def("gae_forward", &fastllm::gae_forward, py::arg("rewards"), py::arg("values"), py::arg("mask"),
        py::arg("gamma"), py::arg("lam"));
}
