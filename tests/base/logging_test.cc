#include "runtime/base/logging.h"

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

class LoggingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    previous_ = GetLogLevel();
    SetLogSink([this](LogLevel level, std::string_view, int, std::string_view message) {
      lines_.push_back(StrCat(LogLevelName(level), ":", message));
    });
  }
  void TearDown() override {
    SetLogSink({});
    SetLogLevel(previous_);
  }
  LogLevel previous_;
  std::vector<std::string> lines_;
};

int g_formatted = 0;
int CountFormatting() {
  ++g_formatted;
  return 1;
}

TEST_F(LoggingTest, LevelFiltersAndSkipsFormatting) {
  SetLogLevel(LogLevel::kWarning);
  g_formatted = 0;
  ECSS_LOG(Info) << "hidden " << CountFormatting();
  ECSS_LOG(Warning) << "shown " << 42;
  ECSS_LOG(Error) << "also shown";
  EXPECT_EQ(g_formatted, 0);
  EXPECT_EQ(lines_, (std::vector<std::string>{"warning:shown 42", "error:also shown"}));
  SetLogLevel(LogLevel::kOff);
  ECSS_LOG(Error) << "silenced";
  EXPECT_EQ(lines_.size(), 2u);
}

TEST_F(LoggingTest, MacroIsOneStatementInIfElse) {
  SetLogLevel(LogLevel::kDebug);
  bool flag = false;
  if (flag)
    ECSS_LOG(Debug) << "then";
  else
    ECSS_LOG(Debug) << "else";
  EXPECT_EQ(lines_, (std::vector<std::string>{"debug:else"}));
}

TEST(LogLevelTest, Parse) {
  EXPECT_EQ(*ParseLogLevel("debug"), LogLevel::kDebug);
  EXPECT_EQ(*ParseLogLevel("off"), LogLevel::kOff);
  StatusOr<LogLevel> bad = ParseLogLevel("verbose");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("verbose"), std::string_view::npos);
}

TEST(StrCatTest, HumanBytes) {
  EXPECT_EQ(HumanBytes(512), "512 B");
  EXPECT_EQ(HumanBytes(1536), "1.50 KiB");
  EXPECT_EQ(HumanBytes(uint64_t{3} << 30), "3.00 GiB");
}

}  // namespace
}  // namespace ecss
