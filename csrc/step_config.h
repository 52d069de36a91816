// The step configuration that fastmask.ops._native sends as a dict (step_config_dict and
// shard_config), parsed in one place for the CPU and CUDA bindings. Host code (pybind11).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace fastmask {

struct StepConfig {
  int base, rescale;  // base: 0 sgd, 1 adam, 2 adamw; rescale: 0 none, 1 ht, 2 legacy
  double lr, momentum, dampening, beta1, beta2, eps, weight_decay, ratio, min_prob, fisher_beta;
  double grad_coefficient, update_coefficient;
  bool nesterov, maximize, masked, poisson, ema, row, freeze, ge, modulate_update, exact;
  uint64_t seed;
  // per tensor, empty unless sharded: the full tensor's units and elements, and the
  // full-tensor index of the first local unit and element
  std::vector<int64_t> full_units, full_numels, first_units, first_elements;
  py::object reduce_sums;  // None, or called with the [T, 4] float64 pass-1 sums

  bool sharded() const { return !full_units.empty(); }
};

inline StepConfig parse_step_config(const py::dict& d) {
  StepConfig c;
  auto real = [&](const char* key) { return d[key].cast<double>(); };
  auto flag = [&](const char* key) { return d[key].cast<bool>(); };
  c.base = d["base"].cast<int>();
  c.rescale = d["rescale"].cast<int>();
  c.lr = real("lr");
  c.momentum = real("momentum");
  c.dampening = real("dampening");
  c.beta1 = real("beta1");
  c.beta2 = real("beta2");
  c.eps = real("eps");
  c.weight_decay = real("weight_decay");
  c.ratio = real("ratio");
  c.min_prob = real("min_prob");
  c.fisher_beta = real("fisher_beta");
  c.grad_coefficient = real("grad_coefficient");
  c.update_coefficient = real("update_coefficient");
  c.nesterov = flag("nesterov");
  c.maximize = flag("maximize");
  c.masked = flag("masked");
  c.poisson = flag("poisson");
  c.ema = flag("ema");
  c.row = flag("row");
  c.freeze = flag("freeze");
  c.ge = flag("ge");
  c.modulate_update = flag("modulate_update");
  c.exact = flag("exact");
  c.seed = d["seed"].cast<uint64_t>();
  if (d.contains("full_units")) {
    auto values = [&](const char* key) { return d[key].cast<std::vector<int64_t>>(); };
    c.full_units = values("full_units");
    c.full_numels = values("full_numels");
    c.first_units = values("first_units");
    c.first_elements = values("first_elements");
  }
  c.reduce_sums = d.contains("reduce_sums") ? py::object(d["reduce_sums"]) : py::object(py::none());
  return c;
}

}  // namespace fastmask
