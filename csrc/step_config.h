// The step configuration of the CPU and CUDA bindings: one typed struct, bound to Python once
// for both (bind_step_config). fastmask.backends.native.native_config fills it from the Python
// KernelConfig, whose field names it shares; assigning a field that does not exist, or a value
// of the wrong type, raises there. Host code (pybind11).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "fastmask_math.h"

namespace fastmask {

struct StepConfig {
  int base = kAdamW, rescale = kNoRescale;  // enums Base and Rescale of fastmask_math.h
  double lr = 0, momentum = 0, dampening = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, ratio = 1,
         min_prob = 0, fisher_beta = 0;
  double grad_coefficient = 1, update_coefficient = 1;
  bool nesterov = false, maximize = false, masked = false, poisson = true, ema = false, row = false, freeze = false,
       ge = false, modulate_update = false, exact = false;
  uint64_t seed = 0;
  // per tensor, empty unless sharded: the full tensor's units and elements, and the
  // full-tensor index of the first local unit and element
  std::vector<int64_t> full_units, full_numels, first_units, first_elements;

  bool sharded() const { return !full_units.empty(); }
  // What the per-tensor reduce (fastmask::tensor_scalars) reads.
  ReduceTerms reduce_terms(bool lr_is_tensor) const {
    return ReduceTerms{base, lr, momentum, dampening, beta1, beta2, eps, weight_decay, nesterov, lr_is_tensor};
  }
};

// Registers StepConfig (module-local: the cpp and cuda extensions each have their own) and the
// enum values as BASE_IDS / RESCALE_IDS, which a test compares with the Python ids.
inline void bind_step_config(py::module_& m) {
  using C = StepConfig;
  py::class_<C>(m, "StepConfig", py::module_local())
      .def(py::init<>())
      .def_readwrite("base", &C::base)
      .def_readwrite("rescale", &C::rescale)
      .def_readwrite("lr", &C::lr)
      .def_readwrite("momentum", &C::momentum)
      .def_readwrite("dampening", &C::dampening)
      .def_readwrite("beta1", &C::beta1)
      .def_readwrite("beta2", &C::beta2)
      .def_readwrite("eps", &C::eps)
      .def_readwrite("weight_decay", &C::weight_decay)
      .def_readwrite("ratio", &C::ratio)
      .def_readwrite("min_prob", &C::min_prob)
      .def_readwrite("fisher_beta", &C::fisher_beta)
      .def_readwrite("grad_coefficient", &C::grad_coefficient)
      .def_readwrite("update_coefficient", &C::update_coefficient)
      .def_readwrite("nesterov", &C::nesterov)
      .def_readwrite("maximize", &C::maximize)
      .def_readwrite("masked", &C::masked)
      .def_readwrite("poisson", &C::poisson)
      .def_readwrite("ema", &C::ema)
      .def_readwrite("row", &C::row)
      .def_readwrite("freeze", &C::freeze)
      .def_readwrite("ge", &C::ge)
      .def_readwrite("modulate_update", &C::modulate_update)
      .def_readwrite("exact", &C::exact)
      .def_readwrite("seed", &C::seed)
      .def_readwrite("full_units", &C::full_units)
      .def_readwrite("full_numels", &C::full_numels)
      .def_readwrite("first_units", &C::first_units)
      .def_readwrite("first_elements", &C::first_elements);
  py::dict base_ids, rescale_ids;
  base_ids["sgd"] = static_cast<int>(kSGD);
  base_ids["adam"] = static_cast<int>(kAdam);
  base_ids["adamw"] = static_cast<int>(kAdamW);
  rescale_ids["none"] = static_cast<int>(kNoRescale);
  rescale_ids["ht"] = static_cast<int>(kHT);
  rescale_ids["legacy"] = static_cast<int>(kLegacy);
  m.attr("BASE_IDS") = base_ids;
  m.attr("RESCALE_IDS") = rescale_ids;
}

}  // namespace fastmask
