// Voidify: lets ECSS_CHECK and ECSS_LOG be single expressions, `cond ? (void)0 : Voidify() &
// stream << ...`, which cannot capture a following `else` as an if-based macro would.
#pragma once

#include <ostream>

namespace ecss::internal {

struct Voidify {
  // Binds looser than << and tighter than ?:.
  void operator&(std::ostream&) {}
};

}  // namespace ecss::internal
