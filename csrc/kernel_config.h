// The pybind11 binding of the step's kernel config (fastmask::KernelConfig, fastmask_math.h: its
// fields declared once, by FASTMASK_KERNEL_CONFIG_FIELDS, for the struct and this binding), and
// of a sharded batch's index spaces. fastmask.backends.native fills both field by field; a field
// that does not exist, or a value of the wrong type, raises there, and
// tests/csrc/test_kernel_config.py checks that StepConfig.kernel_fields and the C++ declaration
// list the same fields, in the same order, of matching types. Host code (pybind11).
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "fastmask_math.h"

namespace fastmask {

// Where each tensor of a batch of shards (FSDP2) lies in its full tensor: the full tensor's
// units and elements, and the full-tensor index of the first local unit and element; all empty
// for a batch of whole tensors.
struct ShardSpaces {
  std::vector<int64_t> full_units, full_numels, first_units, first_elements;

  bool sharded() const { return !full_units.empty(); }
};

// Registers KernelConfig and ShardSpaces (module-local: the cpp and cuda extensions each have
// their own), the config's declared fields as KERNEL_CONFIG_FIELDS ((name, C++ type) pairs, in
// order), and the enum values as BASE_IDS / RESCALE_IDS, which tests compare with the Python side.
inline void bind_kernel_config(py::module_& m) {
  using C = KernelConfig;
  py::class_<C> cls(m, "KernelConfig", py::module_local());
  cls.def(py::init<>());
  py::list fields;
#define FASTMASK_BIND_FIELD(type, name, init) \
  cls.def_readwrite(#name, &C::name);         \
  fields.append(py::make_tuple(#name, #type));
  FASTMASK_KERNEL_CONFIG_FIELDS(FASTMASK_BIND_FIELD)
#undef FASTMASK_BIND_FIELD
  m.attr("KERNEL_CONFIG_FIELDS") = py::tuple(fields);
  py::class_<ShardSpaces>(m, "ShardSpaces", py::module_local())
      .def(py::init<>())
      .def_readwrite("full_units", &ShardSpaces::full_units)
      .def_readwrite("full_numels", &ShardSpaces::full_numels)
      .def_readwrite("first_units", &ShardSpaces::first_units)
      .def_readwrite("first_elements", &ShardSpaces::first_elements);
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
