// Stream and Event: small copyable handles naming a stream or event of one Backend.
// A handle is (backend uid, slot, generation); destroying the object bumps the slot's
// generation, so a stale copy is detected and reported instead of touching freed state.
// The owning wrappers OwnedStream / OwnedEvent (backend.h) destroy on scope exit.
// Plain values, thread-safe to copy; C++17.
#pragma once

#include <cstdint>

namespace ecss {

template <typename Tag>
struct Handle {
  uint32_t backend_uid = 0;
  uint32_t slot = 0;
  uint32_t generation = 0;  // 0: never created (a default-constructed handle)

  bool valid() const { return generation != 0; }
  friend bool operator==(const Handle& a, const Handle& b) {
    return a.backend_uid == b.backend_uid && a.slot == b.slot && a.generation == b.generation;
  }
  friend bool operator!=(const Handle& a, const Handle& b) { return !(a == b); }
};

struct StreamTag {};
struct EventTag {};
using Stream = Handle<StreamTag>;
using Event = Handle<EventTag>;

}  // namespace ecss
