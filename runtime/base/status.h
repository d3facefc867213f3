// Status and StatusOr<T>: how every fallible ECSS call reports its outcome.
// A Status is a cheap value: OK is a null pointer; an error owns a code, a message that names
// the thing that failed, and for I/O the errno and whether a retry can help (RocksDB-style).
// Exceptions never cross a module or thread boundary; Status does.
// Thread-compatible (distinct objects may be used from distinct threads); nothing blocks.
// This header is C++17 so that nvcc-compiled files may include it.
#pragma once

#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "runtime/base/str_cat.h"

namespace ecss {

// Canonical codes (the gRPC/absl set, minus the ones this project has no use for).
enum class StatusCode : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
};

// "INVALID_ARGUMENT", ...
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  // OK.
  Status() noexcept = default;
  // An error; `code` must not be kOk (use Status() for OK).
  Status(StatusCode code, std::string_view message);

  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;
  ~Status() = default;

  static Status Ok() { return Status(); }

  bool ok() const { return state_ == nullptr; }
  StatusCode code() const { return ok() ? StatusCode::kOk : state_->code; }
  // Empty for OK.
  std::string_view message() const;
  // The errno of the system call that failed, or 0.
  int sys_errno() const { return ok() ? 0 : state_->sys_errno; }
  // True when repeating the same operation may succeed (EAGAIN, EINTR, a full queue, ...).
  bool retryable() const { return ok() ? false : state_->retryable; }

  // Builders for the I/O fields; no effect on OK.
  Status WithErrno(int sys_errno) &&;
  Status WithRetryable(bool retryable) &&;
  // Prefixes the message with `context` and ": " (keeps code, errno, retryable); OK stays OK.
  Status Annotate(std::string_view context) const;

  // Explicitly drops an error the caller has no use for (e.g. on a cleanup path that already
  // reports a more important one).
  void IgnoreError() const {}

  // "DATA_LOSS: expert (3, 17) moments: checksum mismatch [errno 5, retryable]"; "OK" for OK.
  std::string ToString() const;

  friend bool operator==(const Status& a, const Status& b);
  friend bool operator!=(const Status& a, const Status& b) { return !(a == b); }

 private:
  struct State {
    StatusCode code;
    int sys_errno;
    bool retryable;
    std::string message;
  };
  std::unique_ptr<State> state_;
};

std::ostream& operator<<(std::ostream& out, const Status& status);

// Constructors for each code, so call sites read as what happened.
Status CancelledError(std::string_view message);
Status UnknownError(std::string_view message);
Status InvalidArgumentError(std::string_view message);
Status DeadlineExceededError(std::string_view message);
Status NotFoundError(std::string_view message);
Status AlreadyExistsError(std::string_view message);
Status PermissionDeniedError(std::string_view message);
Status ResourceExhaustedError(std::string_view message);
Status FailedPreconditionError(std::string_view message);
Status AbortedError(std::string_view message);
Status OutOfRangeError(std::string_view message);
Status UnimplementedError(std::string_view message);
Status InternalError(std::string_view message);
Status UnavailableError(std::string_view message);
Status DataLossError(std::string_view message);

// A failed system call: maps `sys_errno` to a code (ENOENT -> NotFound, ENOSPC ->
// ResourceExhausted, EACCES -> PermissionDenied, EIO -> Unavailable ...), marks EAGAIN, EINTR,
// EBUSY and ETIMEDOUT retryable, and writes "context: strerror"; the number is sys_errno(),
// which ToString appends ("[errno N]").
Status ErrnoError(int sys_errno, std::string_view context);
// The same, with the context made of `parts` as StrCat makes it, inside the call: write
// ErrnoError(errno, "cannot open '", path, "'"). In ErrnoError(errno, StrCat(...)) the order
// in which the two arguments are evaluated is unspecified, and StrCat's allocations may change
// errno before it is read. A part that allocates by itself (HumanBytes(n), path.string()) has
// the same problem: copy errno into a variable first.
template <typename... Parts, typename = std::enable_if_t<(sizeof...(Parts) > 1)>>
Status ErrnoError(int sys_errno, const Parts&... parts) {
  const std::string context = StrCat(parts...);
  return ErrnoError(sys_errno, std::string_view{context});
}

namespace internal {
[[noreturn]] void DieBecauseStatusOrHoldsNoValue(const Status& status);
[[noreturn]] void DieBecauseStatusOrGotOk();
}  // namespace internal

// Either a value of type T or an error Status (never an OK Status without a value).
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  using value_type = T;

  // An error. Passing an OK status is a programming error and aborts.
  StatusOr(Status status) : status_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    if (status_.ok()) internal::DieBecauseStatusOrGotOk();
  }
  StatusOr(const T& value) : value_(value) {}        // NOLINT(google-explicit-constructor)
  StatusOr(T&& value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  // Converting construction (e.g. unique_ptr<Derived> into StatusOr<unique_ptr<Base>>).
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U&&, T> &&
                                                    !std::is_same_v<std::decay_t<U>, T> &&
                                                    !std::is_same_v<std::decay_t<U>, Status>>>
  StatusOr(U&& value) : value_(std::forward<U>(value)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return status_.ok(); }
  const Status& status() const& { return status_; }
  Status status() && { return std::move(status_); }

  // REQUIRES: ok(). Aborts with the error otherwise.
  const T& value() const& {
    EnsureValue();
    return *value_;
  }
  T& value() & {
    EnsureValue();
    return *value_;
  }
  T&& value() && {
    EnsureValue();
    return std::move(*value_);
  }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

 private:
  void EnsureValue() const {
    if (!value_.has_value()) internal::DieBecauseStatusOrHoldsNoValue(status_);
  }

  Status status_;
  std::optional<T> value_;
};

}  // namespace ecss

#define ECSS_STATUS_CONCAT_INNER(a, b) a##b
#define ECSS_STATUS_CONCAT(a, b) ECSS_STATUS_CONCAT_INNER(a, b)

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define ECSS_RETURN_IF_ERROR(expr)                 \
  do {                                             \
    ::ecss::Status ecss_status_internal_ = (expr); \
    if (!ecss_status_internal_.ok()) {             \
      return ecss_status_internal_;                \
    }                                              \
  } while (0)

// `lhs = value of rexpr` when it holds a value; otherwise returns its Status.
// `lhs` may declare a variable: ECSS_ASSIGN_OR_RETURN(auto buffer, pool.Allocate(n, tag));
// NOLINTBEGIN(bugprone-macro-parentheses): `lhs` may be a declaration.
#define ECSS_ASSIGN_OR_RETURN(lhs, rexpr) \
  ECSS_ASSIGN_OR_RETURN_IMPL(ECSS_STATUS_CONCAT(ecss_statusor_, __LINE__), lhs, rexpr)
#define ECSS_ASSIGN_OR_RETURN_IMPL(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                               \
  if (!tmp.ok()) return std::move(tmp).status();    \
  lhs = std::move(tmp).value()
// NOLINTEND(bugprone-macro-parentheses)
