#include "runtime/base/file_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

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

// A child process that runs `take` (a lock's or a directory's Acquire) and then holds what it
// took until Kill or the object's end. `take` returns what it took (a path), empty on failure.
class HeldByChild {
 public:
  explicit HeldByChild(const std::function<std::string()>& take) {
    int pipe_ends[2];
    if (::pipe(pipe_ends) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(pipe_ends[0]);
      const std::string taken = take();
      if (::write(pipe_ends[1], taken.data(), taken.size()) != static_cast<ssize_t>(taken.size())) {
        ::_exit(1);
      }
      ::close(pipe_ends[1]);
      while (true) ::pause();
    }
    ::close(pipe_ends[1]);  // so that a child that dies early ends the read
    char buffer[4096];
    ssize_t n = 0;
    while (pid_ > 0 && (n = ::read(pipe_ends[0], buffer, sizeof(buffer))) > 0) {
      taken_.append(buffer, static_cast<size_t>(n));
    }
    ::close(pipe_ends[0]);
  }
  HeldByChild(const HeldByChild&) = delete;
  HeldByChild& operator=(const HeldByChild&) = delete;
  ~HeldByChild() { Kill(); }
  void Kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
  pid_t pid() const { return pid_; }
  const std::string& taken() const { return taken_; }  // empty when `take` failed

 private:
  pid_t pid_ = -1;
  std::string taken_;
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

// CheckFileWritable answers what WriteFileAtomically would, and leaves nothing behind: an
// existing file stays as it was.
TEST_F(FileUtilTest, AWritableCheckWritesNothing) {
  const std::string path = dir_ + "/f";
  EXPECT_TRUE(CheckFileWritable(path).ok());
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 0);
  ASSERT_TRUE(WriteFileAtomically(path, "kept").ok());
  EXPECT_TRUE(CheckFileWritable(path).ok());
  EXPECT_EQ(*ReadFileToString(path), "kept");
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 1);
  const Status missing = CheckFileWritable(dir_ + "/missing/f");
  EXPECT_EQ(missing.code(), StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("'" + dir_ + "/missing/f'"), std::string::npos)
      << missing.ToString();
  const Status directory = CheckFileWritable(dir_);
  EXPECT_EQ(directory.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(directory.message().find("is a directory"), std::string::npos) << directory.ToString();
  // As WriteFileAtomically would fail, with the same codes.
  EXPECT_EQ(WriteFileAtomically(dir_ + "/missing/f", "x").code(), missing.code());
  EXPECT_EQ(WriteFileAtomically(dir_, "x").code(), directory.code());
}

// The start of a writer's temporary files' names for a path is its file name's, whatever the
// directory: what a directory's owner matches its entries against.
TEST_F(FileUtilTest, TemporaryPrefixOfIsTheFileNameAndTheMark) {
  EXPECT_EQ(TemporaryPrefixOf(dir_ + "/state.json"), "state.json.tmp.");
  EXPECT_EQ(TemporaryPrefixOf("state.json"), "state.json.tmp.");
  EXPECT_EQ(TemporaryPrefixOf("a/b/blobs"), "blobs.tmp.");
}

// What a writer killed mid-way leaves, PATH.tmp.PID (locked while it lived), goes with the
// next write or check of PATH; a live writer's stays, and so do other paths' and names that are
// not a writer's. A link left at this process's own temporary name is never written through.
TEST_F(FileUtilTest, AKilledWritersTemporaryFileGoesWithTheNextWriteOfItsPath) {
  const std::string path = dir_ + "/f";
  auto writing = [&]() -> std::string {  // a writer's state mid-way, as WriteFileAtomically has it
    const std::string temporary = StrCat(path, ".tmp.", ::getpid());
    const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 || ::flock(fd, LOCK_EX | LOCK_NB) != 0 || ::write(fd, "half", 4) != 4) return "";
    return temporary;  // the fd stays open (locked) until the child dies
  };
  HeldByChild killed(writing), alive(writing);
  ASSERT_FALSE(killed.taken().empty());
  ASSERT_FALSE(alive.taken().empty());
  killed.Kill();
  ASSERT_TRUE(std::filesystem::exists(killed.taken())) << "a killed writer leaves it";
  const std::vector<std::string> kept = {alive.taken(), path + ".tmp.1x", dir_ + "/g.tmp.1",
                                         path + ".tmp.2/inside"};
  for (const std::string& name : kept) {
    std::filesystem::create_directories(std::filesystem::path(name).parent_path());
    std::ofstream(name) << "someone's";
  }
  EXPECT_TRUE(CheckFileWritable(path).ok());
  EXPECT_FALSE(std::filesystem::exists(killed.taken()));
  std::ofstream(killed.taken()) << "half";  // killed again, unlocked
  ASSERT_TRUE(WriteFileAtomically(path, "whole").ok());
  EXPECT_FALSE(std::filesystem::exists(killed.taken()));
  EXPECT_EQ(*ReadFileToString(path), "whole");
  for (const std::string& name : kept) {
    EXPECT_TRUE(std::filesystem::exists(name)) << name << ": not a dead writer's";
  }
  alive.Kill();
  ASSERT_TRUE(WriteFileAtomically(path, "again").ok());
  EXPECT_FALSE(std::filesystem::exists(alive.taken()));
  const std::string target = dir_ + "/target";
  ASSERT_TRUE(WriteFileAtomically(target, "keep").ok());
  std::filesystem::create_symlink(target, StrCat(path, ".tmp.", ::getpid()));
  ASSERT_TRUE(WriteFileAtomically(path, "new").ok());
  EXPECT_EQ(*ReadFileToString(target), "keep");
  EXPECT_EQ(*ReadFileToString(path), "new");
  EXPECT_FALSE(std::filesystem::is_symlink(path));
}

// Two processes writing the same path at once each take the other's temporary file for a live
// writer's, never for a killed one's: every write succeeds, the file is one of them whole, and
// nothing is left beside it.
TEST_F(FileUtilTest, WritersOfOnePathAtOnceAllSucceed) {
  const std::string path = dir_ + "/f";
  constexpr int kWrites = 100;
  std::vector<pid_t> writers;
  for (const char* contents : {"first writer", "second writer"}) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      for (int i = 0; i < kWrites; ++i) {
        if (!WriteFileAtomically(path, contents).ok()) ::_exit(1);
      }
      ::_exit(0);
    }
    writers.push_back(pid);
  }
  for (pid_t pid : writers) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "a write failed";
  }
  const std::string written = *ReadFileToString(path);
  EXPECT_TRUE(written == "first writer" || written == "second writer") << written;
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 1) << "no temporaries";
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
  HeldByChild child([&]() -> std::string {
    auto lock = FileLock::Acquire(path, "x");
    if (!lock.ok()) return "";
    in_child = std::move(*lock);
    return path;
  });
  ASSERT_EQ(child.taken(), path);
  Status held = FileLock::Acquire(path, "the test directory").status();
  EXPECT_EQ(held.code(), StatusCode::kFailedPrecondition) << held;
  EXPECT_NE(held.message().find(StrCat("process ", child.pid())), std::string_view::npos) << held;
  child.Kill();
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
    const std::string path = made->path();
    ASSERT_EQ(path.rfind(mine, 0), 0u) << path;
    EXPECT_EQ(path.size(), mine.size() + 6) << "the pid, then 6 random digits";
    { std::ofstream(path + "/experts.bin") << "states"; }
    auto second = ScratchDir::Create(dir_, "scratch.");
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_NE(second->path(), path);
    EXPECT_TRUE(std::filesystem::exists(path + "/experts.bin"))
        << "a second Create removes nothing";
    std::optional<ScratchDir> moved;
    {
      ScratchDir source = std::move(*made);
      moved.emplace(std::move(source));
    }  // a moved-from object's end removes nothing
    EXPECT_EQ(moved->path(), path);
    EXPECT_TRUE(std::filesystem::exists(path + "/experts.bin"));
    moved.reset();
    EXPECT_FALSE(std::filesystem::exists(path));
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir_)) << "gone with their objects";
  // Two other processes' directories: one killed, one alive.
  std::optional<ScratchDir> in_child;
  auto take = [&]() -> std::string {
    auto dir = ScratchDir::Create(dir_, "scratch.");
    if (!dir.ok()) return "";
    in_child.emplace(std::move(*dir));
    std::ofstream(in_child->path() + "/experts.bin") << "states";
    return in_child->path();
  };
  HeldByChild killed(take), alive(take);
  ASSERT_FALSE(killed.taken().empty());
  ASSERT_FALSE(alive.taken().empty());
  killed.Kill();
  ASSERT_TRUE(std::filesystem::exists(killed.taken() + "/experts.bin"))
      << "a killed owner leaves it";
  // Cleared before a caller sizes its free space, and by Create.
  ScratchDir::RemoveLeftovers(dir_, "scratch.");
  EXPECT_FALSE(std::filesystem::exists(killed.taken()));
  EXPECT_TRUE(std::filesystem::exists(alive.taken() + "/experts.bin"));
  {
    auto made = ScratchDir::Create(dir_, "scratch.");
    ASSERT_TRUE(made.ok()) << made.status();
    EXPECT_TRUE(std::filesystem::exists(alive.taken() + "/experts.bin")) << "a live owner's stays";
  }
  alive.Kill();
  auto made = ScratchDir::Create(dir_, "scratch.");
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_FALSE(std::filesystem::exists(alive.taken()));
  EXPECT_EQ(ScratchDir::Create(dir_ + "/missing", "scratch.").status().code(),
            StatusCode::kNotFound);
}

}  // namespace
}  // namespace ecss
