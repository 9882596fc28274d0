// lm_advise_huge_pages(p, n): huge pages for a fresh buffer (cpu_kernels.advise_huge_pages:
// the tape of a long sequence is tens of MiB, and faulting it in 4 KiB pages cost more
// than the gate math, benchmarks/NOTES.md section 9).
#pragma once

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Ask the kernel to back the 2 MiB-aligned interior of a fresh buffer with huge pages:
// one page fault per 2 MiB instead of one per 4 KiB on first touch (Linux with
// transparent huge pages on 'madvise' or 'always'; elsewhere it does nothing).
extern "C" int lm_advise_huge_pages(void* p, long n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const unsigned long huge = 2ul << 20;
  const unsigned long start = ((unsigned long)p + huge - 1) & ~(huge - 1);
  const unsigned long end = ((unsigned long)p + (unsigned long)n) & ~(huge - 1);
  if (end > start) return madvise((void*)start, end - start, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
  return 0;
}
