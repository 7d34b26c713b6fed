// DSX_HOST_DEVICE: a small function both backends call, compiled for host and device under nvcc and as a plain
// inline function elsewhere (headers shared with plain C++ code and GoogleTest stay free of CUDA and torch).
#pragma once

#if defined(__CUDACC__)
#define DSX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSX_HOST_DEVICE inline
#endif
