// Everything a variant's translation unit needs after its generated gate math (see
// lm_loops.h for what the generated part defines and what the library exports).
#pragma once
#include "lm_loops.h"   // the step and sequence loops, lm_nonlinearities
#include "lm_blas.h"    // the framework's BLAS, at its integer width (with OpenMP)
#include "lm_split.h"   // the batch split over threads on that BLAS (with OpenMP)
#include "lm_memory.h"  // lm_advise_huge_pages
