// Backend conformance: stream order, events, copies, capacity, sticky errors, concurrency and
// misuse, identical for every backend. See conformance.h.
#include "tests/device/conformance.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

namespace ecss::testing {
namespace {

constexpr uint64_t kMiB = uint64_t{1} << 20;

void FillPattern(uint8_t* data, size_t bytes, uint32_t seed) {
  uint32_t state = seed * 2654435761u + 1;
  for (size_t i = 0; i < bytes; ++i) {
    state = state * 1664525u + 1013904223u;
    data[i] = static_cast<uint8_t>(state >> 24);
  }
}

TEST_P(BackendConformanceTest, StreamRunsWorkInFifoOrder) {
  StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "fifo");
  ASSERT_TRUE(stream.ok());
  std::vector<int> order;
  for (int i = 0; i < 500; ++i) {
    ASSERT_TRUE(backend_
                    ->LaunchHostFunction(stream->get(), "append",
                                         [&order, i] {
                                           order.push_back(i);
                                           return Status::Ok();
                                         })
                    .ok());
  }
  ASSERT_TRUE(backend_->SynchronizeStream(stream->get()).ok());
  ASSERT_EQ(order.size(), 500u);
  for (int i = 0; i < 500; ++i) ASSERT_EQ(order[i], i);
}

TEST_P(BackendConformanceTest, CopiesAndHostWorkInterleaveInOrder) {
  if (CopiesMoveNoBytes()) GTEST_SKIP() << "timed mode moves no bytes";
  // h2d(A) ; host writes A ; d2h -> B : B must hold A's value from before the host write.
  StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "ordered");
  ASSERT_TRUE(stream.ok());
  StatusOr<Buffer> device = backend_->device_memory().Allocate(4096, MemoryTag::kOther);
  ASSERT_TRUE(device.ok());
  std::vector<uint8_t> a(4096, 1), b(4096, 0);
  const Stream s = stream->get();
  ASSERT_TRUE(
      backend_->CopyAsync(s, device->data(), a.data(), a.size(), CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(backend_
                  ->LaunchHostFunction(s, "overwrite",
                                       [&a] {
                                         std::memset(a.data(), 2, a.size());
                                         return Status::Ok();
                                       })
                  .ok());
  ASSERT_TRUE(
      backend_->CopyAsync(s, b.data(), device->data(), b.size(), CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(backend_->SynchronizeStream(s).ok());
  EXPECT_EQ(b, std::vector<uint8_t>(4096, 1));
  EXPECT_EQ(a, std::vector<uint8_t>(4096, 2));
}

TEST_P(BackendConformanceTest, EventOrdersAcrossStreams) {
  if (CopiesMoveNoBytes()) GTEST_SKIP() << "timed mode moves no bytes";
  StatusOr<OwnedStream> producer = CreateOwnedStream(*backend_, "producer");
  StatusOr<OwnedStream> consumer = CreateOwnedStream(*backend_, "consumer");
  StatusOr<OwnedEvent> ready = CreateOwnedEvent(*backend_);
  ASSERT_TRUE(producer.ok() && consumer.ok() && ready.ok());
  StatusOr<Buffer> device = backend_->device_memory().Allocate(kMiB, MemoryTag::kOther);
  ASSERT_TRUE(device.ok());
  std::vector<uint8_t> source(kMiB), result(kMiB, 0);
  FillPattern(source.data(), source.size(), 3);

  std::atomic<bool> produced{false};
  ASSERT_TRUE(backend_
                  ->LaunchHostFunction(producer->get(), "slow",
                                       [&produced] {
                                         std::this_thread::sleep_for(std::chrono::milliseconds(30));
                                         produced = true;
                                         return Status::Ok();
                                       })
                  .ok());
  ASSERT_TRUE(backend_
                  ->CopyAsync(producer->get(), device->data(), source.data(), source.size(),
                              CopyKind::kHostToDevice)
                  .ok());
  ASSERT_TRUE(backend_->RecordEvent(ready->get(), producer->get()).ok());
  ASSERT_TRUE(backend_->WaitEvent(consumer->get(), ready->get()).ok());
  bool seen_produced = false;
  ASSERT_TRUE(backend_
                  ->LaunchHostFunction(consumer->get(), "check",
                                       [&] {
                                         seen_produced = produced.load();
                                         return Status::Ok();
                                       })
                  .ok());
  ASSERT_TRUE(backend_
                  ->CopyAsync(consumer->get(), result.data(), device->data(), result.size(),
                              CopyKind::kDeviceToHost)
                  .ok());
  ASSERT_TRUE(backend_->SynchronizeStream(consumer->get()).ok());
  EXPECT_TRUE(seen_produced);
  EXPECT_EQ(result, source);
  StatusOr<bool> done = backend_->QueryEvent(ready->get());
  ASSERT_TRUE(done.ok());
  EXPECT_TRUE(*done);
}

TEST_P(BackendConformanceTest, EventQueryAndHostSynchronize) {
  StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "s");
  StatusOr<OwnedEvent> event = CreateOwnedEvent(*backend_);
  ASSERT_TRUE(stream.ok() && event.ok());
  StatusOr<bool> never = backend_->QueryEvent(event->get());
  ASSERT_TRUE(never.ok());
  EXPECT_TRUE(*never) << "a never-recorded event counts as complete";
  EXPECT_TRUE(backend_->SynchronizeEvent(event->get()).ok());
  // Waiting on a never-recorded event is a no-op, not a deadlock.
  ASSERT_TRUE(backend_->WaitEvent(stream->get(), event->get()).ok());
  ASSERT_TRUE(backend_->SynchronizeStream(stream->get()).ok());

  std::atomic<bool> release{false};
  ASSERT_TRUE(backend_
                  ->LaunchHostFunction(stream->get(), "gate",
                                       [&release] {
                                         while (!release.load())
                                           std::this_thread::sleep_for(
                                               std::chrono::milliseconds(1));
                                         return Status::Ok();
                                       })
                  .ok());
  ASSERT_TRUE(backend_->RecordEvent(event->get(), stream->get()).ok());
  StatusOr<bool> pending = backend_->QueryEvent(event->get());
  ASSERT_TRUE(pending.ok());
  EXPECT_FALSE(*pending);
  release = true;
  EXPECT_TRUE(backend_->SynchronizeEvent(event->get()).ok());
  EXPECT_TRUE(*backend_->QueryEvent(event->get()));
}

// Host -> device -> device -> host for sizes from 1 byte to 256 MiB at unaligned offsets.
TEST_P(BackendConformanceTest, CopiesAreExactForAllSizesAndOffsets) {
  if (CopiesMoveNoBytes()) GTEST_SKIP() << "timed mode moves no bytes";
  const size_t sizes[] = {1, 3, 255, 4097, kMiB + 7, 64 * kMiB + 1, 256 * kMiB};
  const size_t largest = 256 * kMiB;
  StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "copies");
  ASSERT_TRUE(stream.ok());
  StatusOr<Buffer> first = backend_->device_memory().Allocate(largest + 64, MemoryTag::kOther);
  StatusOr<Buffer> second = backend_->device_memory().Allocate(largest + 64, MemoryTag::kOther);
  ASSERT_TRUE(first.ok() && second.ok());
  std::vector<uint8_t> source(largest + 16), result(largest + 16);
  FillPattern(source.data(), source.size(), 11);
  uint32_t round = 0;
  for (size_t bytes : sizes) {
    const size_t src_offset = 1 + round % 7;
    const size_t device_offset = 3 + round % 5;
    const size_t dst_offset = 5 + round % 3;
    ++round;
    std::memset(result.data(), 0, result.size());
    uint8_t* d1 = first->as<uint8_t>() + device_offset;
    uint8_t* d2 = second->as<uint8_t>() + device_offset + 1;
    const Stream s = stream->get();
    ASSERT_TRUE(
        backend_->CopyAsync(s, d1, source.data() + src_offset, bytes, CopyKind::kHostToDevice)
            .ok());
    ASSERT_TRUE(backend_->CopyAsync(s, d2, d1, bytes, CopyKind::kDeviceToDevice).ok());
    ASSERT_TRUE(
        backend_->CopyAsync(s, result.data() + dst_offset, d2, bytes, CopyKind::kDeviceToHost)
            .ok());
    ASSERT_TRUE(backend_->SynchronizeStream(s).ok());
    ASSERT_EQ(std::memcmp(result.data() + dst_offset, source.data() + src_offset, bytes), 0)
        << bytes << " bytes";
    ASSERT_EQ(result[dst_offset - 1], 0) << "wrote before the destination";
    ASSERT_EQ(result[dst_offset + bytes], 0) << "wrote past the destination";
  }
  const CopyStats stats = backend_->copy_stats();
  EXPECT_EQ(stats.copies[static_cast<int>(CopyKind::kHostToDevice)], std::size(sizes));
  EXPECT_GE(stats.bytes[static_cast<int>(CopyKind::kDeviceToHost)], largest);
}

TEST_P(BackendConformanceTest, MemsetAndPinnedPoolCopies) {
  if (CopiesMoveNoBytes()) GTEST_SKIP() << "timed mode moves no bytes";
  StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "memset");
  ASSERT_TRUE(stream.ok());
  PinnedPoolOptions pool_options;
  pool_options.capacity_bytes = 8 * kMiB;
  StatusOr<std::unique_ptr<PinnedHostPool>> pool = backend_->CreatePinnedPool(pool_options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  StatusOr<Buffer> pinned = (*pool)->Allocate(kMiB, MemoryTag::kStaging);
  StatusOr<Buffer> device = backend_->device_memory().Allocate(kMiB, MemoryTag::kOther);
  ASSERT_TRUE(pinned.ok() && device.ok());
  ASSERT_TRUE(backend_->MemsetAsync(stream->get(), device->data(), 0xab, kMiB).ok());
  ASSERT_TRUE(
      backend_
          ->CopyAsync(stream->get(), pinned->data(), device->data(), kMiB, CopyKind::kDeviceToHost)
          .ok());
  ASSERT_TRUE(backend_->SynchronizeStream(stream->get()).ok());
  for (size_t i = 0; i < kMiB; ++i) ASSERT_EQ(pinned->as<uint8_t>()[i], 0xab) << i;
  EXPECT_EQ((*pool)->Allocate(8 * kMiB, MemoryTag::kStaging).status().code(),
            StatusCode::kResourceExhausted)
      << "the pool's budget holds";
}

TEST_P(BackendConformanceTest, CapacityIsEnforcedAndRecovers) {
  Allocator& memory = backend_->device_memory();
  EXPECT_EQ(memory.capacity_bytes(), kDeviceMemoryBytes);
  std::vector<Buffer> held;
  while (true) {
    StatusOr<Buffer> block = memory.Allocate(64 * kMiB, MemoryTag::kExpertWeights);
    if (!block.ok()) {
      EXPECT_EQ(block.status().code(), StatusCode::kResourceExhausted);
      break;
    }
    held.push_back(std::move(*block));
    ASSERT_LE(memory.stats().used_bytes, memory.capacity_bytes());
  }
  ASSERT_EQ(held.size(), kDeviceMemoryBytes / (64 * kMiB));
  // A request larger than the capacity fails the same way and changes nothing.
  EXPECT_EQ(memory.Allocate(2 * kDeviceMemoryBytes, MemoryTag::kOther).status().code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(memory.stats().live_allocations, held.size());
  held.pop_back();
  StatusOr<Buffer> again = memory.Allocate(64 * kMiB, MemoryTag::kExpertWeights);
  EXPECT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(memory.stats().peak_used_bytes, kDeviceMemoryBytes);
}

TEST_P(BackendConformanceTest, HostFunctionErrorIsStickyAndSkipsLaterWork) {
  StatusOr<Stream> stream = backend_->CreateStream("failing");
  StatusOr<OwnedEvent> event = CreateOwnedEvent(*backend_);
  ASSERT_TRUE(stream.ok() && event.ok());
  bool ran_after = false;
  ASSERT_TRUE(backend_
                  ->LaunchHostFunction(
                      *stream, "fails",
                      [] { return DataLossError("expert (1, 2) weights: checksum mismatch"); })
                  .ok());
  ASSERT_TRUE(backend_
                  ->LaunchHostFunction(*stream, "after",
                                       [&ran_after] {
                                         ran_after = true;
                                         return Status::Ok();
                                       })
                  .ok());
  ASSERT_TRUE(backend_->RecordEvent(event->get(), *stream).ok());
  Status first = backend_->SynchronizeStream(*stream);
  EXPECT_EQ(first.code(), StatusCode::kDataLoss);
  EXPECT_NE(first.message().find("checksum mismatch"), std::string_view::npos) << first;
  EXPECT_NE(first.message().find("failing"), std::string_view::npos) << first;
  EXPECT_FALSE(ran_after);
  EXPECT_EQ(backend_->SynchronizeStream(*stream), first) << "sticky";
  EXPECT_EQ(backend_->SynchronizeEvent(event->get()).code(), StatusCode::kDataLoss);
  EXPECT_EQ(backend_->DestroyStream(*stream).code(), StatusCode::kDataLoss);
  // Other streams are unaffected.
  StatusOr<OwnedStream> healthy = CreateOwnedStream(*backend_, "healthy");
  ASSERT_TRUE(healthy.ok());
  EXPECT_TRUE(backend_->SynchronizeStream(healthy->get()).ok());
}

TEST_P(BackendConformanceTest, ConcurrentStreamsFromManyThreads) {
  if (CopiesMoveNoBytes()) GTEST_SKIP() << "timed mode moves no bytes";
  constexpr int kThreads = 4;
  constexpr int kRounds = 40;
  StatusOr<OwnedEvent> shared_event = CreateOwnedEvent(*backend_);
  ASSERT_TRUE(shared_event.ok());
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "worker");
      StatusOr<Buffer> device = backend_->device_memory().Allocate(64 * 1024, MemoryTag::kOther);
      if (!stream.ok() || !device.ok()) {
        ++failures;
        return;
      }
      std::vector<uint8_t> in(64 * 1024), out(64 * 1024);
      for (int round = 0; round < kRounds; ++round) {
        FillPattern(in.data(), in.size(), static_cast<uint32_t>(t * 1000 + round));
        const Stream s = stream->get();
        bool ok =
            backend_->CopyAsync(s, device->data(), in.data(), in.size(), CopyKind::kHostToDevice)
                .ok() &&
            backend_->RecordEvent(shared_event->get(), s).ok() &&
            backend_->WaitEvent(s, shared_event->get()).ok() &&
            backend_->CopyAsync(s, out.data(), device->data(), out.size(), CopyKind::kDeviceToHost)
                .ok() &&
            backend_->SynchronizeStream(s).ok();
        if (!ok || in != out) ++failures;
        // Allocation churn from every thread at once.
        StatusOr<Buffer> scratch = backend_->device_memory().Allocate(4096, MemoryTag::kWorkspace);
        if (!scratch.ok()) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_TRUE(backend_->SynchronizeAll().ok());
  EXPECT_EQ(backend_->device_memory().stats().used_bytes, 0u);
}

TEST_P(BackendConformanceTest, DestroyedAndForeignHandlesAreErrors) {
  StatusOr<Stream> stream = backend_->CreateStream("short-lived");
  StatusOr<Event> event = backend_->CreateEvent();
  ASSERT_TRUE(stream.ok() && event.ok());
  ASSERT_TRUE(backend_->DestroyStream(*stream).ok());
  ASSERT_TRUE(backend_->DestroyEvent(*event).ok());

  StatusOr<Buffer> device = backend_->device_memory().Allocate(64, MemoryTag::kOther);
  ASSERT_TRUE(device.ok());
  char host[64] = {};
  Status stale = backend_->CopyAsync(*stream, device->data(), host, 64, CopyKind::kHostToDevice);
  EXPECT_EQ(stale.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(stale.message().find("destroyed"), std::string_view::npos) << stale;
  EXPECT_EQ(backend_->SynchronizeStream(*stream).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend_->DestroyStream(*stream).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend_->DestroyEvent(*event).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(backend_->QueryEvent(*event).status().code(), StatusCode::kFailedPrecondition);

  EXPECT_EQ(backend_->SynchronizeStream(Stream{}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->RecordEvent(Event{}, Stream{}).code(), StatusCode::kInvalidArgument);

  // A handle from another backend instance is rejected, not used.
  StatusOr<std::unique_ptr<Backend>> other = GetParam().create(kMiB);
  ASSERT_TRUE(other.ok());
  StatusOr<Stream> foreign = (*other)->CreateStream("foreign");
  ASSERT_TRUE(foreign.ok());
  Status wrong = backend_->SynchronizeStream(*foreign);
  EXPECT_EQ(wrong.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.message().find("belongs to backend"), std::string_view::npos) << wrong;

  // A recreated stream reusing the slot does not revive the stale handle.
  StatusOr<OwnedStream> fresh = CreateOwnedStream(*backend_, "fresh");
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(backend_->SynchronizeStream(*stream).code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(backend_->SynchronizeStream(fresh->get()).ok());
}

TEST_P(BackendConformanceTest, OutOfBoundsAndMisdirectedCopiesAreRejected) {
  StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "bounds");
  ASSERT_TRUE(stream.ok());
  StatusOr<Buffer> device = backend_->device_memory().Allocate(1024, MemoryTag::kOther);
  StatusOr<Buffer> neighbour = backend_->device_memory().Allocate(1024, MemoryTag::kOther);
  ASSERT_TRUE(device.ok() && neighbour.ok());
  const Stream s = stream->get();
  ASSERT_TRUE(backend_->MemsetAsync(s, neighbour->data(), 0x77, 1024).ok());
  std::vector<uint8_t> host(4096, 1);

  Status past = backend_->CopyAsync(s, device->as<uint8_t>() + 512, host.data(), 1024,
                                    CopyKind::kHostToDevice);
  EXPECT_EQ(past.code(), StatusCode::kOutOfRange);
  EXPECT_NE(past.message().find("h2d copy destination"), std::string_view::npos) << past;
  EXPECT_EQ(
      backend_->CopyAsync(s, host.data(), device->data(), 2048, CopyKind::kDeviceToHost).code(),
      StatusCode::kOutOfRange);
  EXPECT_EQ(
      backend_->CopyAsync(s, host.data(), host.data() + 8, 8, CopyKind::kDeviceToDevice).code(),
      StatusCode::kOutOfRange)
      << "host memory is not device memory";
  EXPECT_EQ(backend_
                ->CopyAsync(s, device->data(), device->as<uint8_t>() + 100, 200,
                            CopyKind::kDeviceToDevice)
                .code(),
            StatusCode::kInvalidArgument)
      << "overlapping d2d";
  EXPECT_EQ(backend_->CopyAsync(s, nullptr, host.data(), 8, CopyKind::kHostToDevice).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(backend_->MemsetAsync(s, device->as<uint8_t>() + 1000, 0, 100).code(),
            StatusCode::kOutOfRange);
  EXPECT_TRUE(backend_->CopyAsync(s, device->data(), host.data(), 0, CopyKind::kHostToDevice).ok())
      << "zero bytes is a no-op";

  // Nothing was written by the rejected calls: the neighbour block is intact.
  std::vector<uint8_t> check(1024, 0);
  ASSERT_TRUE(
      backend_->CopyAsync(s, check.data(), neighbour->data(), 1024, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(backend_->SynchronizeStream(s).ok()) << "rejected calls do not poison the stream";
  if (!CopiesMoveNoBytes()) {
    EXPECT_EQ(check, std::vector<uint8_t>(1024, 0x77));
  }
}

TEST_P(BackendConformanceTest, DestroyStreamDrainsQueuedWork) {
  StatusOr<Stream> stream = backend_->CreateStream("drain");
  ASSERT_TRUE(stream.ok());
  std::atomic<int> ran{0};
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(backend_
                    ->LaunchHostFunction(*stream, "tick",
                                         [&ran] {
                                           std::this_thread::sleep_for(
                                               std::chrono::microseconds(500));
                                           ++ran;
                                           return Status::Ok();
                                         })
                    .ok());
  }
  EXPECT_TRUE(backend_->DestroyStream(*stream).ok());
  EXPECT_EQ(ran.load(), 20);
}

TEST_P(BackendConformanceTest, CapabilitiesDescribeTheBackend) {
  const BackendCapabilities& caps = backend_->capabilities();
  EXPECT_FALSE(caps.name.empty());
  EXPECT_FALSE(caps.device_name.empty());
  EXPECT_EQ(caps.device_memory_bytes, kDeviceMemoryBytes);
  EXPECT_EQ(backend_->device_memory().device(), caps.device);
  if (!caps.host_kernels) {
    StatusOr<OwnedStream> stream = CreateOwnedStream(*backend_, "k");
    ASSERT_TRUE(stream.ok());
    EXPECT_EQ(backend_->LaunchKernel(stream->get(), KernelTask{"k", [] { return Status::Ok(); }, 0})
                  .code(),
              StatusCode::kUnimplemented);
  }
}

}  // namespace
}  // namespace ecss::testing
