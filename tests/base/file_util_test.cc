#include "runtime/base/file_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "runtime/base/str_cat.h"

namespace ecss {
namespace {

class FileUtilTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/ecss_file_util_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(FileUtilTest, AtomicWritesReplaceWholeFiles) {
  const std::string path = dir_ + "/f";
  ASSERT_TRUE(WriteFileAtomically(path, "first").ok());
  ASSERT_TRUE(WriteFileAtomically(path, "second").ok());
  EXPECT_EQ(*ReadFileToString(path), "second");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 1) << "no temporaries";
  EXPECT_EQ(WriteFileAtomically(dir_ + "/missing/f", "x").code(), StatusCode::kNotFound);
  EXPECT_EQ(SyncDirectory(dir_ + "/missing").code(), StatusCode::kNotFound);
}

// One owner at a time, in this process (each Acquire is an owner) and across processes; the
// file goes with its owner, and a killed owner's lock is released by the kernel.
TEST_F(FileUtilTest, ALockHasOneOwnerAndDiesWithItsProcess) {
  const std::string path = dir_ + "/lock";
  {
    auto lock = FileLock::Acquire(path, "the test directory");
    ASSERT_TRUE(lock.ok()) << lock.status();
    Status second = FileLock::Acquire(path, "the test directory").status();
    EXPECT_EQ(second.code(), StatusCode::kFailedPrecondition) << second;
    EXPECT_NE(second.message().find(StrCat("the test directory is in use by process ", ::getpid())),
              std::string_view::npos)
        << second;
  }
  EXPECT_FALSE(std::filesystem::exists(path)) << "released: removed";
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // holds the lock until killed
    auto lock = FileLock::Acquire(path, "x");
    const char byte = lock.ok() ? 'y' : 'n';
    if (::write(ready[1], &byte, 1) != 1) ::_exit(1);
    while (true) ::pause();
  }
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  ASSERT_EQ(byte, 'y');
  Status held = FileLock::Acquire(path, "the test directory").status();
  EXPECT_EQ(held.code(), StatusCode::kFailedPrecondition) << held;
  EXPECT_NE(held.message().find(StrCat("process ", child)), std::string_view::npos) << held;
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  EXPECT_TRUE(std::filesystem::exists(path)) << "a killed owner leaves its file";
  auto after = FileLock::Acquire(path, "the test directory");
  EXPECT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(FileLock::Acquire(dir_ + "/missing/lock", "x").status().code(), StatusCode::kNotFound);
}

// A lock file removed behind its owner's back (a cleanup script): the owner's release leaves
// the next owner's file alone, so that one stays exclusive.
TEST_F(FileUtilTest, AReleaseNeverRemovesAnotherOwnersLockFile) {
  const std::string path = dir_ + "/lock";
  auto first = std::move(FileLock::Acquire(path, "x")).value();
  std::filesystem::remove(path);
  auto second = FileLock::Acquire(path, "x");
  ASSERT_TRUE(second.ok()) << second.status();
  first.reset();
  EXPECT_TRUE(std::filesystem::exists(path));
  EXPECT_EQ(FileLock::Acquire(path, "x").status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace ecss
