#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

// Rows of `outer` independent lines of length `inner`, split over threads in blocks of rows.
template <typename F>
inline void fc_parallel_rows(int64_t outer, int64_t inner, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(inner, 1));
  at::parallel_for(0, outer, grain, f);
}
