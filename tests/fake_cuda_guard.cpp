// tests/fake_cuda.py's one piece of C++: a no-op device guard for DeviceType::CUDA, installed only where torch
// was built without CUDA (the slot is empty there). torch.tensor(..., device="cuda"), Tensor.to("cuda") and
// copies between devices go through the dispatcher's device guards before any kernel runs; with no CUDA guard
// registered they stop with "PyTorch is not linked with support for cuda devices", whatever handles the tensors.
#include <torch/extension.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {
struct FakeCudaGuard final : public c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA> {};
}  // namespace

static bool install() {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)];
  if (slot.load() != nullptr) return false;  // a CUDA build: never replace the real guard
  static FakeCudaGuard guard;
  slot.store(&guard);
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("install", &install, "install the no-op CUDA device guard"); }
