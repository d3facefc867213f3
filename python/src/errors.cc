#include "python/src/errors.h"

#include <array>
#include <string>

namespace ecss::python {
namespace {

namespace py = pybind11;

constexpr int kCodes = static_cast<int>(StatusCode::kDataLoss) + 1;

// "INVALID_ARGUMENT" -> "InvalidArgument": the Python class of a code.
std::string ClassName(std::string_view code_name) {
  std::string name;
  bool upper = true;
  for (char c : code_name) {
    if (c == '_') {
      upper = true;
      continue;
    }
    name += upper ? c : static_cast<char>(c - 'A' + 'a');
    upper = false;
  }
  return name;
}

// Leaked on purpose: the classes live as long as the interpreter holds the module, and a
// static destructor running after the interpreter has finalised must not touch them.
std::array<PyObject*, kCodes>& Classes() {
  static auto* classes = new std::array<PyObject*, kCodes>{};
  return *classes;
}

}  // namespace

void RegisterErrors(py::module_& module) {
  PyObject* base = PyErr_NewExceptionWithDoc(
      "ecss.Error",
      "An ECSS call failed. `code` names the status code (e.g. 'INVALID_ARGUMENT'); the "
      "subclass is the code's (ecss.InvalidArgument, ...); `errno` is a failed system call's "
      "number (as OSError's), else None.",
      PyExc_RuntimeError, nullptr);
  py::handle(base).attr("errno") = py::none();  // every instance has it, as OSError's do
  module.add_object("Error", py::handle(base));
  for (int code = 1; code < kCodes; ++code) {
    std::string name = ClassName(StatusCodeName(static_cast<StatusCode>(code)));
    std::string qualified = "ecss." + name;
    PyObject* cls = PyErr_NewException(qualified.c_str(), base, nullptr);
    py::handle(cls).attr("code") = std::string(StatusCodeName(static_cast<StatusCode>(code)));
    module.add_object(name.c_str(), py::handle(cls));
    Classes()[code] = cls;
  }
  // pybind11's translator type takes the exception_ptr by value.
  py::register_exception_translator(
      [](std::exception_ptr thrown) {  // NOLINT(performance-unnecessary-value-param)
        try {
          if (thrown) std::rethrow_exception(thrown);
        } catch (const StatusError& error) {
          const Status& status = error.status();
          PyObject* cls = Classes()[static_cast<int>(status.code())];
          py::object exception = py::reinterpret_steal<py::object>(
              PyObject_CallFunction(cls, "s", std::string(status.message()).c_str()));
          if (!exception) return;  // the call set its own error
          exception.attr("code") = std::string(StatusCodeName(status.code()));
          exception.attr("message") = std::string(status.message());
          // A failed system call's number, as OSError's errno (None for other errors).
          exception.attr("errno") =
              status.sys_errno() != 0 ? py::object(py::int_(status.sys_errno())) : py::none();
          PyErr_SetObject(cls, exception.ptr());
        }
      });
}

}  // namespace ecss::python
