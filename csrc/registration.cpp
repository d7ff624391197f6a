// The scaleforge operator library: schemas, and the CPU implementations registered for the
// CPU dispatch key. The CUDA ones register from cuda/binding.cpp, built only when torch
// has CUDA. Autograd and fake (meta) implementations are registered from Python (ops.py).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(scaleforge, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, float eps) "
        "-> (Tensor, Tensor)");
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) "
        "-> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_y, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, "
        "int ignore_index=-100, int chunk_tokens=0) -> Tensor");
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
        "Tensor targets, int ignore_index=-100, int chunk_tokens=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scaleforge, CPU, m) {
  m.impl("rms_norm", &scaleforge::rms_norm_cpu);
  m.impl("rms_norm_backward", &scaleforge::rms_norm_backward_cpu);
  m.impl("rope", &scaleforge::rope_cpu);
  m.impl("rope_backward", &scaleforge::rope_backward_cpu);
  m.impl("swiglu", &scaleforge::swiglu_cpu);
  m.impl("swiglu_backward", &scaleforge::swiglu_backward_cpu);
  m.impl("linear_cross_entropy", &scaleforge::linear_cross_entropy);
  m.impl("linear_cross_entropy_backward", &scaleforge::linear_cross_entropy_backward);
}
