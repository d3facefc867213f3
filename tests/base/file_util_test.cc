#include "runtime/base/file_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
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

void KillChild(pid_t child) {
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
}

// Forks a child that runs `take` (a lock's or a directory's Acquire) and then holds what it took
// until KillChild; its pid, or -1 when `take` failed there.
pid_t HoldInChild(const std::function<bool()>& take) {
  int ready[2];
  if (::pipe(ready) != 0) return -1;
  const pid_t child = ::fork();
  if (child == 0) {
    const char byte = take() ? 'y' : 'n';
    if (::write(ready[1], &byte, 1) != 1) ::_exit(1);
    while (true) ::pause();
  }
  char byte = 0;
  const bool held = child > 0 && ::read(ready[0], &byte, 1) == 1 && byte == 'y';
  ::close(ready[0]);
  ::close(ready[1]);
  if (child > 0 && !held) KillChild(child);
  return held ? child : -1;
}

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
  std::unique_ptr<FileLock> in_child;
  const pid_t child = HoldInChild([&] {
    auto lock = FileLock::Acquire(path, "x");
    if (lock.ok()) in_child = std::move(*lock);
    return lock.ok();
  });
  ASSERT_GT(child, 0);
  Status held = FileLock::Acquire(path, "the test directory").status();
  EXPECT_EQ(held.code(), StatusCode::kFailedPrecondition) << held;
  EXPECT_NE(held.message().find(StrCat("process ", child)), std::string_view::npos) << held;
  KillChild(child);
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

// A scratch directory is its process's while it lives and gone after; one that a killed
// process left is removed by the next Create under its prefix, one that a live process holds
// never is.
TEST_F(FileUtilTest, AScratchDirOutlivesNoOneButItsKilledOwner) {
  const std::string mine = StrCat(dir_, "/scratch.", ::getpid());
  {
    auto made = ScratchDir::Create(dir_, "scratch.");
    ASSERT_TRUE(made.ok()) << made.status();
    EXPECT_EQ(made->path(), mine);
    { std::ofstream(mine + "/experts.bin") << "states"; }
    EXPECT_EQ(ScratchDir::Create(dir_, "scratch.").status().code(), StatusCode::kAlreadyExists);
    EXPECT_TRUE(std::filesystem::exists(mine + "/experts.bin"))
        << "a second Create removes nothing";
    ScratchDir moved = std::move(*made);
    EXPECT_EQ(moved.path(), mine);
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir_)) << "gone with its object, once";
  // Two other processes' directories: one killed, one alive.
  std::optional<ScratchDir> in_child;
  pid_t children[2];
  for (pid_t& child : children) {
    child = HoldInChild([&] {
      auto dir = ScratchDir::Create(dir_, "scratch.");
      if (!dir.ok()) return false;
      in_child.emplace(std::move(*dir));
      std::ofstream(in_child->path() + "/experts.bin") << "states";
      return true;
    });
    ASSERT_GT(child, 0);
  }
  KillChild(children[0]);
  const std::string killed = StrCat(dir_, "/scratch.", children[0]);
  const std::string alive = StrCat(dir_, "/scratch.", children[1]);
  ASSERT_TRUE(std::filesystem::exists(killed + "/experts.bin")) << "a killed owner leaves it";
  // Cleared before a caller sizes its free space, and by Create.
  ScratchDir::RemoveLeftovers(dir_, "scratch.");
  EXPECT_FALSE(std::filesystem::exists(killed));
  EXPECT_TRUE(std::filesystem::exists(alive + "/experts.bin"));
  {
    auto made = ScratchDir::Create(dir_, "scratch.");
    ASSERT_TRUE(made.ok()) << made.status();
    EXPECT_TRUE(std::filesystem::exists(alive + "/experts.bin")) << "a live owner's stays";
  }
  KillChild(children[1]);
  auto made = ScratchDir::Create(dir_, "scratch.");
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_FALSE(std::filesystem::exists(alive));
  EXPECT_EQ(ScratchDir::Create(dir_ + "/missing", "scratch.").status().code(),
            StatusCode::kNotFound);
}

}  // namespace
}  // namespace ecss
