#include "runtime/base/status.h"

#include <cerrno>
#include <cstring>
#include <memory>
#include <ostream>

#include <gtest/gtest.h>

#include "runtime/base/check.h"
#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

TEST(StatusTest, DefaultIsOkAndEmpty) {
  Status status;
  EXPECT_TRUE(status.ok());
  EXPECT_EQ(status.code(), StatusCode::kOk);
  EXPECT_EQ(status.message(), "");
  EXPECT_EQ(status.sys_errno(), 0);
  EXPECT_FALSE(status.retryable());
  EXPECT_EQ(status.ToString(), "OK");
  EXPECT_EQ(status, Status::Ok());
}

TEST(StatusTest, ErrorCarriesCodeMessageAndIoFields) {
  Status status = DataLossError("expert (3, 17) moments: checksum mismatch").WithErrno(EIO);
  EXPECT_FALSE(status.ok());
  EXPECT_EQ(status.code(), StatusCode::kDataLoss);
  EXPECT_EQ(status.message(), "expert (3, 17) moments: checksum mismatch");
  EXPECT_EQ(status.sys_errno(), EIO);
  EXPECT_EQ(status.ToString(), "DATA_LOSS: expert (3, 17) moments: checksum mismatch [errno 5]");
  Status busy = UnavailableError("queue full").WithRetryable(true);
  EXPECT_TRUE(busy.retryable());
  EXPECT_EQ(busy.ToString(), "UNAVAILABLE: queue full [retryable]");
}

TEST(StatusTest, OkCodeWithMessageStaysOk) { EXPECT_TRUE(Status(StatusCode::kOk, "ignored").ok()); }

TEST(StatusTest, CopyAndCompare) {
  Status a = NotFoundError("missing");
  Status b = a;
  EXPECT_EQ(a, b);
  b = InvalidArgumentError("other");
  EXPECT_NE(a, b);
  EXPECT_EQ(a.message(), "missing");
  Status moved = std::move(b);
  EXPECT_EQ(moved.code(), StatusCode::kInvalidArgument);
}

TEST(StatusTest, AnnotateKeepsCodeAndIoFields) {
  Status base = ErrnoError(EAGAIN, "submit");
  Status annotated = base.Annotate("nvme engine");
  EXPECT_EQ(annotated.code(), base.code());
  EXPECT_EQ(annotated.sys_errno(), EAGAIN);
  EXPECT_TRUE(annotated.retryable());
  EXPECT_EQ(annotated.message().substr(0, 20), "nvme engine: submit:");
  EXPECT_TRUE(Status().Annotate("context").ok());
}

TEST(StatusTest, ErrnoMapping) {
  EXPECT_EQ(ErrnoError(ENOENT, "open").code(), StatusCode::kNotFound);
  EXPECT_EQ(ErrnoError(ENOSPC, "write").code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrnoError(EACCES, "open").code(), StatusCode::kPermissionDenied);
  EXPECT_EQ(ErrnoError(EIO, "read").code(), StatusCode::kUnavailable);
  EXPECT_FALSE(ErrnoError(EIO, "read").retryable());
  EXPECT_TRUE(ErrnoError(EINTR, "read").retryable());
  EXPECT_TRUE(ErrnoError(EBUSY, "read").retryable());
  EXPECT_FALSE(ErrnoError(ENOSPC, "write").retryable());
  // The number once, from ToString (the message has the text; it used to have both).
  Status status = ErrnoError(ENOENT, "cannot open '/nope'");
  EXPECT_EQ(status.message(), StrCat("cannot open '/nope': ", std::strerror(ENOENT)));
  EXPECT_EQ(status.sys_errno(), ENOENT);
  const std::string text = status.ToString();
  EXPECT_NE(text.find("[errno 2]"), std::string::npos) << text;
  EXPECT_EQ(text.find("errno"), text.rfind("errno")) << text;
}

// A part whose formatting changes errno, as an allocation may.
struct ClobbersErrno {
  friend std::ostream& operator<<(std::ostream& out, const ClobbersErrno&) {
    errno = EBADF;
    return out << "part";
  }
};

TEST(StatusTest, ErrnoIsReadBeforeTheContextIsFormatted) {
  errno = ENOSPC;
  Status status = ErrnoError(errno, "cannot write '", ClobbersErrno{}, "' at ", 4096);
  EXPECT_EQ(status.sys_errno(), ENOSPC) << status;
  EXPECT_EQ(status.code(), StatusCode::kResourceExhausted) << status;
  EXPECT_EQ(status.message(), StrCat("cannot write 'part' at 4096: ", std::strerror(ENOSPC)));
}

TEST(StatusTest, EveryCodeHasAName) {
  for (int code = 0; code <= static_cast<int>(StatusCode::kDataLoss); ++code) {
    EXPECT_NE(StatusCodeName(static_cast<StatusCode>(code)), "UNKNOWN_CODE") << code;
  }
}

StatusOr<int> Half(int value) {
  if (value % 2 != 0) return InvalidArgumentError("odd");
  return value / 2;
}

Status QuarterInto(int value, int* out) {
  ECSS_ASSIGN_OR_RETURN(int half, Half(value));
  ECSS_ASSIGN_OR_RETURN(*out, Half(half));
  return Status::Ok();
}

Status FailsWhen(bool fail) {
  ECSS_RETURN_IF_ERROR(fail ? AbortedError("asked to") : Status::Ok());
  return Status::Ok();
}

TEST(StatusOrTest, HoldsValueOrError) {
  StatusOr<int> good = Half(8);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 4);
  StatusOr<int> bad = Half(3);
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
}

TEST(StatusOrTest, MacrosPropagate) {
  int out = 0;
  EXPECT_TRUE(QuarterInto(8, &out).ok());
  EXPECT_EQ(out, 2);
  EXPECT_EQ(QuarterInto(6, &out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(FailsWhen(true).code(), StatusCode::kAborted);
  EXPECT_TRUE(FailsWhen(false).ok());
}

struct Base {
  virtual ~Base() = default;
  virtual int Id() const { return 0; }
};
struct Derived : Base {
  int Id() const override { return 7; }
};

StatusOr<std::unique_ptr<Base>> MakeDerived() { return std::make_unique<Derived>(); }

TEST(StatusOrTest, MoveOnlyAndConvertingValues) {
  StatusOr<std::unique_ptr<Base>> made = MakeDerived();
  ASSERT_TRUE(made.ok());
  std::unique_ptr<Base> owned = std::move(made).value();
  EXPECT_EQ(owned->Id(), 7);
}

TEST(StatusOrDeathTest, ValueOfErrorAborts) {
  StatusOr<int> bad = Half(3);
  EXPECT_DEATH((void)bad.value(), "INVALID_ARGUMENT: odd");
}

TEST(StatusOrDeathTest, OkStatusWithoutValueAborts) {
  EXPECT_DEATH(StatusOr<int>{Status::Ok()}, "OK Status without a value");
}

TEST(CheckDeathTest, FailedCheckPrintsConditionAndMessage) {
  int slot = 9;
  EXPECT_DEATH(ECSS_CHECK(slot < 4) << "slot " << slot, "slot < 4 slot 9");
  EXPECT_DEATH(ECSS_CHECK_OK(InternalError("broken")), "INTERNAL: broken");
}

}  // namespace
}  // namespace ecss
