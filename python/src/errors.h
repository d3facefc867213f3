// Status -> Python exception: ecss.Error, and a subclass per status code (ecss.InvalidArgument,
// ecss.NotFound, ...), each carrying `code` (the code's name, "INVALID_ARGUMENT") and the
// message. The bindings call ThrowIfError on every Status they get; the translator registered
// by RegisterErrors turns the C++ exception into the Python one.
#pragma once

#include <pybind11/pybind11.h>

#include <exception>
#include <utility>

#include "runtime/base/status.h"

namespace ecss::python {

// Carries a non-OK Status from the bindings to the exception translator.
class StatusError : public std::exception {
 public:
  explicit StatusError(Status status) : status_(std::move(status)) {}
  const Status& status() const { return status_; }
  const char* what() const noexcept override { return "ecss status error"; }

 private:
  Status status_;
};

inline void ThrowIfError(const Status& status) {
  if (!status.ok()) throw StatusError(status);
}
template <typename T>
T ValueOrThrow(StatusOr<T> value) {
  ThrowIfError(value.status());
  return std::move(value).value();
}

// Creates ecss.Error and its subclasses in `module` and registers the translator.
void RegisterErrors(pybind11::module_& module);

}  // namespace ecss::python
