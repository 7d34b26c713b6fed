// DSX_HOST_DEVICE: a small function both backends call, compiled for host and device under nvcc and as a plain
// inline function elsewhere (headers shared with plain C++ code and GoogleTest stay free of CUDA and torch).
#pragma once

// DSX_HOST_DEVICE_INLINE: the same, always inlined on the host too, for templates the CPU instantiates with
// simd.h vectors: inlined into a DSX_TARGET_* wrapper, they are compiled for that wrapper's instruction set.
#if defined(__CUDACC__)
#define DSX_HOST_DEVICE __host__ __device__ __forceinline__
#define DSX_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#else
#define DSX_HOST_DEVICE inline
#define DSX_HOST_DEVICE_INLINE inline __attribute__((always_inline))
#endif
