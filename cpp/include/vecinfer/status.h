// Status values returned by every vecinfer entry point. The core never throws and never exits;
// callers (the Python binding, C++ users) turn a non-OK status into their own error.
#pragma once

namespace vecinfer {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument,    // a shape, size, pointer or parameter is outside what the op accepts
  kUnsupported,        // a valid request this build or op does not implement (e.g. head_dim 96)
  kNotBuiltWithCuda,   // a CUDA entry point was called on a CPU-only build
  kDeviceUnsupported,  // the current GPU is older than the kernels' minimum architecture
  kCudaError,          // the CUDA runtime reported an error (launch or configuration)
};

struct Status {
  StatusCode code = StatusCode::kOk;
  const char* message = "";  // a static string naming the argument and what was expected

  bool ok() const { return code == StatusCode::kOk; }
  static Status Ok() { return {}; }
};

inline Status invalid(const char* message) { return {StatusCode::kInvalidArgument, message}; }
inline Status unsupported(const char* message) { return {StatusCode::kUnsupported, message}; }

}  // namespace vecinfer
