#include "runtime/base/stop_request.h"

#include <signal.h>

#include <cstdlib>

#include <gtest/gtest.h>

namespace ecss {
namespace {

TEST(StopRequestTest, ASignalIsRecordedAndNotFatal) {
  StopRequest::Clear();
  ASSERT_TRUE(StopRequest::Install({SIGUSR1, SIGUSR2}).ok());
  EXPECT_EQ(StopRequest::requested(), 0);
  ASSERT_EQ(raise(SIGUSR2), 0);  // the process lives on
  EXPECT_EQ(StopRequest::requested(), SIGUSR2);
  StopRequest::Clear();
  EXPECT_EQ(StopRequest::requested(), 0);
  ASSERT_TRUE(StopRequest::Install({SIGUSR2}).ok());  // one-shot: installed again to catch again
  ASSERT_EQ(raise(SIGUSR2), 0);
  EXPECT_EQ(StopRequest::requested(), SIGUSR2);
  StopRequest::Clear();
  signal(SIGUSR1, SIG_DFL);
  signal(SIGUSR2, SIG_DFL);
}

// The handler is one-shot: a second signal has its default effect (here: termination), so a
// loop that does not stop in time is still ended by a second SIGTERM.
TEST(StopRequestDeathTest, ASecondSignalOfAnotherKindHasItsDefaultEffect) {
  EXPECT_EXIT(
      {
        StopRequest::Clear();
        if (!StopRequest::Install({SIGUSR1, SIGUSR2}).ok()) std::_Exit(3);
        raise(SIGUSR1);
        if (StopRequest::requested() != SIGUSR1) std::_Exit(4);
        raise(SIGUSR2);
        std::_Exit(5);
      },
      testing::KilledBySignal(SIGUSR2), "");
}

TEST(StopRequestDeathTest, TheSecondSignalHasItsDefaultEffect) {
  EXPECT_EXIT(
      {
        StopRequest::Clear();
        if (!StopRequest::Install({SIGUSR2}).ok()) std::_Exit(3);
        raise(SIGUSR2);
        if (StopRequest::requested() != SIGUSR2) std::_Exit(4);
        raise(SIGUSR2);
        std::_Exit(5);
      },
      testing::KilledBySignal(SIGUSR2), "");
}

TEST(StopRequestTest, SignalsThatCannotBeCaughtAreRefused) {
  EXPECT_EQ(StopRequest::Install({SIGKILL}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(StopRequest::Install({SIGSTOP}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(StopRequest::Install({0}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(StopRequest::Install({100000}).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ecss
