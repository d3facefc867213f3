#include "runtime/base/status.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "runtime/base/str_cat.h"

namespace ecss {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "OK";
    case StatusCode::kCancelled:
      return "CANCELLED";
    case StatusCode::kUnknown:
      return "UNKNOWN";
    case StatusCode::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case StatusCode::kDeadlineExceeded:
      return "DEADLINE_EXCEEDED";
    case StatusCode::kNotFound:
      return "NOT_FOUND";
    case StatusCode::kAlreadyExists:
      return "ALREADY_EXISTS";
    case StatusCode::kPermissionDenied:
      return "PERMISSION_DENIED";
    case StatusCode::kResourceExhausted:
      return "RESOURCE_EXHAUSTED";
    case StatusCode::kFailedPrecondition:
      return "FAILED_PRECONDITION";
    case StatusCode::kAborted:
      return "ABORTED";
    case StatusCode::kOutOfRange:
      return "OUT_OF_RANGE";
    case StatusCode::kUnimplemented:
      return "UNIMPLEMENTED";
    case StatusCode::kInternal:
      return "INTERNAL";
    case StatusCode::kUnavailable:
      return "UNAVAILABLE";
    case StatusCode::kDataLoss:
      return "DATA_LOSS";
  }
  return "UNKNOWN_CODE";
}

Status::Status(StatusCode code, std::string_view message) {
  if (code == StatusCode::kOk) {
    // An OK code with a message is a caller's mistake; keep OK semantics (null state) rather
    // than inventing an error.
    return;
  }
  state_ = std::make_unique<State>(State{code, 0, false, std::string(message)});
}

Status::Status(const Status& other)
    : state_(other.state_ ? std::make_unique<State>(*other.state_) : nullptr) {}

Status& Status::operator=(const Status& other) {
  if (this != &other) state_ = other.state_ ? std::make_unique<State>(*other.state_) : nullptr;
  return *this;
}

std::string_view Status::message() const {
  if (ok()) return {};
  return state_->message;
}

Status Status::WithErrno(int sys_errno) && {
  if (state_) state_->sys_errno = sys_errno;
  return std::move(*this);
}

Status Status::WithRetryable(bool retryable) && {
  if (state_) state_->retryable = retryable;
  return std::move(*this);
}

Status Status::Annotate(std::string_view context) const {
  if (ok()) return Status();
  Status annotated(state_->code, StrCat(context, ": ", state_->message));
  annotated.state_->sys_errno = state_->sys_errno;
  annotated.state_->retryable = state_->retryable;
  return annotated;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string text = StrCat(StatusCodeName(state_->code), ": ", state_->message);
  if (state_->sys_errno != 0 || state_->retryable) {
    text += " [";
    if (state_->sys_errno != 0) text += StrCat("errno ", state_->sys_errno);
    if (state_->retryable) text += state_->sys_errno != 0 ? ", retryable" : "retryable";
    text += "]";
  }
  return text;
}

bool operator==(const Status& a, const Status& b) {
  if (a.ok() || b.ok()) return a.ok() == b.ok();
  return a.state_->code == b.state_->code && a.state_->message == b.state_->message &&
         a.state_->sys_errno == b.state_->sys_errno && a.state_->retryable == b.state_->retryable;
}

std::ostream& operator<<(std::ostream& out, const Status& status) {
  return out << status.ToString();
}

Status CancelledError(std::string_view m) { return Status(StatusCode::kCancelled, m); }
Status UnknownError(std::string_view m) { return Status(StatusCode::kUnknown, m); }
Status InvalidArgumentError(std::string_view m) { return Status(StatusCode::kInvalidArgument, m); }
Status DeadlineExceededError(std::string_view m) {
  return Status(StatusCode::kDeadlineExceeded, m);
}
Status NotFoundError(std::string_view m) { return Status(StatusCode::kNotFound, m); }
Status AlreadyExistsError(std::string_view m) { return Status(StatusCode::kAlreadyExists, m); }
Status PermissionDeniedError(std::string_view m) {
  return Status(StatusCode::kPermissionDenied, m);
}
Status ResourceExhaustedError(std::string_view m) {
  return Status(StatusCode::kResourceExhausted, m);
}
Status FailedPreconditionError(std::string_view m) {
  return Status(StatusCode::kFailedPrecondition, m);
}
Status AbortedError(std::string_view m) { return Status(StatusCode::kAborted, m); }
Status OutOfRangeError(std::string_view m) { return Status(StatusCode::kOutOfRange, m); }
Status UnimplementedError(std::string_view m) { return Status(StatusCode::kUnimplemented, m); }
Status InternalError(std::string_view m) { return Status(StatusCode::kInternal, m); }
Status UnavailableError(std::string_view m) { return Status(StatusCode::kUnavailable, m); }
Status DataLossError(std::string_view m) { return Status(StatusCode::kDataLoss, m); }

namespace {

StatusCode CodeForErrno(int sys_errno) {
  switch (sys_errno) {
    case 0:
      return StatusCode::kUnknown;
    case EINVAL:
    case ENAMETOOLONG:
    case E2BIG:
    case EISDIR:
    case ENOTDIR:
    case EBADF:
      return StatusCode::kInvalidArgument;
    case ENOENT:
    case ENXIO:
    case ENODEV:
      return StatusCode::kNotFound;
    case EEXIST:
      return StatusCode::kAlreadyExists;
    case EACCES:
    case EPERM:
    case EROFS:
      return StatusCode::kPermissionDenied;
    case ENOSPC:
    case ENOMEM:
    case EMFILE:
    case ENFILE:
    case EDQUOT:
    case EFBIG:
      return StatusCode::kResourceExhausted;
    case EAGAIN:
    case EBUSY:
    case EINTR:
    case EIO:
      return StatusCode::kUnavailable;
    case ETIMEDOUT:
      return StatusCode::kDeadlineExceeded;
    case ECANCELED:
      return StatusCode::kCancelled;
    case ENOSYS:
    case EOPNOTSUPP:
      return StatusCode::kUnimplemented;
    case ERANGE:
    case EOVERFLOW:
      return StatusCode::kOutOfRange;
    default:
      return StatusCode::kUnknown;
  }
}

bool RetryableErrno(int sys_errno) {
  return sys_errno == EAGAIN || sys_errno == EINTR || sys_errno == EBUSY || sys_errno == ETIMEDOUT;
}

}  // namespace

Status ErrnoError(int sys_errno, std::string_view context) {
  return Status(CodeForErrno(sys_errno), StrCat(context, ": ", std::strerror(sys_errno)))
      .WithErrno(sys_errno)
      .WithRetryable(RetryableErrno(sys_errno));
}

namespace internal {

void DieBecauseStatusOrHoldsNoValue(const Status& status) {
  std::fprintf(stderr, "ECSS fatal: value() of a StatusOr holding an error: %s\n",
               status.ToString().c_str());
  std::abort();
}

void DieBecauseStatusOrGotOk() {
  std::fprintf(stderr, "ECSS fatal: StatusOr constructed from an OK Status without a value\n");
  std::abort();
}

}  // namespace internal
}  // namespace ecss
