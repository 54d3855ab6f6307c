// cuda_emu.h — run a CUDA C kernel file on the CPU, to check it (not to make it fast).
//
// Every kernels/*.cu file is the only text of its kernels. On a GPU, NVRTC compiles it. Here, g++
// compiles the *same file* with this header force-included (g++ -include cuda_emu.h), and
// minift/cuda/emulator.py calls the kernels through ctypes. The execution model:
//
//   launch(grid, block):  blockDim.x*y*z real std::threads are started: the thread pool of this
//                         launch. The blocks of the grid run one after another on that pool.
//   one block:            every pool thread sets its threadIdx/blockIdx and runs the kernel body.
//                         __syncthreads() is a std::barrier over the block's threads. A thread that
//                         returns leaves the barriers (an exited GPU thread no longer counts).
//   between blocks:       shared memory is poisoned with 0xFF bytes (NaN as a float): real shared
//                         memory starts with garbage, so a kernel that reads what it never wrote
//                         must fail here as well.
//
// What maps to what:
//   threadIdx, blockIdx, blockDim, gridDim  thread_local variables, set per thread and block
//   __syncthreads()                         std::barrier of the block
//   __shared__ T x[...]                     a function-static variable: one copy, and as blocks run
//                                           one at a time, one copy per block
//   extern __shared__ T x[]                 the dynamic shared buffer of the launch (the build step
//                                           rewrites this one declaration, see CUDA_EMU_DYNAMIC_SHARED)
//   __shfl_sync / _up / _down / _xor        the lanes of a warp write to a per-warp buffer, meet at a
//   __syncwarp()                            barrier, read their partner's slot, meet again
//   atomicAdd                               std::atomic_ref
//   __half (cuda_fp16.h)                    emu/cuda_fp16.h: _Float16 storage, float conversions
//
// Not emulated — a kernel that uses one of these fails to build with "cuda_emu: ... is not
// supported": warp votes (__ballot_sync, __any_sync, __all_sync, __activemask), __match_*_sync,
// __reduce_*_sync, __syncthreads_count/and/or, cooperative groups, warp-matrix (wmma) code.
// Partial warp masks are refused at run time.
//
// What this can NOT tell you: speed, occupancy, coalescing, bank conflicts, and races *between*
// blocks (blocks never overlap here). Threads that wait at different kinds of barrier (some lanes
// in a shuffle, others in __syncthreads) hang here as they may on a GPU. What it does check: the arithmetic, every index, every
// barrier and every shuffle — wrong indexing, unwritten outputs, reads of unwritten shared memory
// and lanes that shuffle with a lane that already left show up as wrong numbers or as an error.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ---- qualifiers: on the CPU every function is a host function ------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) alignas(n)
// Static shared variables live in one linker section, so that the block runner can poison all of
// them at once (the linker provides __start_/__stop_ symbols around a section with a C name).
// GCC places statics of *inline functions and templates* elsewhere (COMDAT): those are shared
// correctly but not poisoned — declare __shared__ arrays in the kernel itself.
#define __shared__ static __attribute__((section("cuda_emu_shared")))
extern "C" __attribute__((weak)) unsigned char __start_cuda_emu_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_cuda_emu_shared[];

// ---- the built-in variables ----------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace cuda_emu {

constexpr std::size_t kMaxDynamicShared = 48 * 1024;  // what a launch may ask for without opt-in
alignas(16) inline unsigned char dynamic_shared[kMaxDynamicShared];

// The first error of a launch (a partial warp mask, a shuffle with a lane that left ...). Kernels
// cannot throw across threads, so the launch records it and returns it to Python.
inline std::mutex error_mutex;
inline std::string first_error;
inline void fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (first_error.empty()) first_error = "cuda_emu: " + message;
}

// One warp: its lanes exchange values through `slot` between two barrier phases. `round` counts
// the shuffles each lane took part in; a lane that reads a partner whose count differs reads a
// lane that is not there (it returned, or diverged) — undefined on a GPU, an error here.
struct Warp {
    std::unique_ptr<std::barrier<>> barrier;
    unsigned lanes = 0;       // lanes that exist: 32, or fewer in the last warp of a block
    std::uint64_t slot[32] = {};
    unsigned round[32] = {};
    unsigned full_mask() const { return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u; }
};

class BlockRunner;
inline thread_local BlockRunner* runner = nullptr;  // the launch this thread belongs to
inline thread_local unsigned thread_rank = 0;       // linear thread index in the block

// Runs one launch: the pool of blockDim threads, the blocks in turn, the barriers of each block.
class BlockRunner {
public:
    BlockRunner(dim3 grid, dim3 block, std::size_t dynamic_bytes, std::function<void()> body)
        : grid_dim_(grid), block_dim_(block), dynamic_bytes_(dynamic_bytes), body_(std::move(body)),
          threads_(block.x * block.y * block.z), blocks_(grid.x * grid.y * grid.z),
          warps_((threads_ + 31) / 32),
          between_blocks_(threads_, Completion{this}) {}

    void run() {
        prepare_block();
        std::vector<std::thread> pool;
        pool.reserve(threads_);
        for (unsigned t = 0; t < threads_; ++t) pool.emplace_back([this, t] { thread_main(t); });
        for (auto& thread : pool) thread.join();
    }

    void syncthreads() { block_barrier_->arrive_and_wait(); }
    Warp& warp() { return warps_[thread_rank / 32]; }

private:
    struct Completion {  // runs on one thread when every thread has finished the current block
        BlockRunner* self;
        void operator()() noexcept { ++self->current_; self->prepare_block(); }
    };

    // Fresh barriers (exited threads dropped out of the old ones) and poisoned shared memory.
    void prepare_block() {
        if (current_ >= blocks_) return;
        block_barrier_ = std::make_unique<std::barrier<>>(threads_);
        for (unsigned w = 0; w < warps_.size(); ++w) {
            warps_[w].lanes = std::min(32u, threads_ - 32 * w);
            warps_[w].barrier = std::make_unique<std::barrier<>>(warps_[w].lanes);
            std::fill(std::begin(warps_[w].round), std::end(warps_[w].round), 0u);
        }
        std::memset(dynamic_shared, 0xFF, dynamic_bytes_);
        if (__start_cuda_emu_shared != nullptr)
            std::memset(__start_cuda_emu_shared, 0xFF, __stop_cuda_emu_shared - __start_cuda_emu_shared);
    }

    void thread_main(unsigned t) {
        runner = this;
        thread_rank = t;
        blockDim = block_dim_;
        gridDim = grid_dim_;
        threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
        while (current_ < blocks_) {  // current_ only changes while every thread waits below
            const unsigned b = current_;
            blockIdx = {b % gridDim.x, (b / gridDim.x) % gridDim.y, b / (gridDim.x * gridDim.y)};
            body_();
            block_barrier_->arrive_and_drop();  // this thread has left the block ...
            warp().barrier->arrive_and_drop();  // ... and its warp
            between_blocks_.arrive_and_wait();
        }
    }

    dim3 grid_dim_, block_dim_;
    std::size_t dynamic_bytes_;
    std::function<void()> body_;
    unsigned threads_, blocks_;
    unsigned current_ = 0;
    std::unique_ptr<std::barrier<>> block_barrier_;
    std::vector<Warp> warps_;
    std::barrier<Completion> between_blocks_;
};

// ---- warp shuffles ---------------------------------------------------------------------------
// Every lane publishes `value`, all lanes meet, each reads lane `source` (its own value when the
// source is out of range), and all lanes meet again before the slots can be reused.
template <class T>
T shuffle(const char* name, unsigned mask, T value, unsigned source) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "cuda_emu: shuffles move at most 8 bytes");
    Warp& w = runner->warp();
    const unsigned lane = thread_rank % 32;
    if (mask != w.full_mask()) fail(std::string(name) + " with a partial mask is not supported (the mask must name "
                                    "every lane of the warp, " + std::to_string(w.lanes) + " here)");
    std::memcpy(&w.slot[lane], &value, sizeof(T));
    ++w.round[lane];
    w.barrier->arrive_and_wait();
    T result = value;
    if (source != lane) {
        if (source >= w.lanes || w.round[source] != w.round[lane])
            fail(std::string(name) + ": lane " + std::to_string(lane) + " read lane " +
                 std::to_string(source) + ", which is not taking part (exited or diverged)");
        else
            std::memcpy(&result, &w.slot[source], sizeof(T));
    }
    w.barrier->arrive_and_wait();
    return result;
}

inline bool valid_width(const char* name, int width) {
    if (width > 0 && width <= 32 && (width & (width - 1)) == 0) return true;
    fail(std::string(name) + ": width must be a power of two <= 32, got " + std::to_string(width));
    return false;
}

}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::runner->syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    cuda_emu::Warp& w = cuda_emu::runner->warp();
    if (mask != w.full_mask()) cuda_emu::fail("__syncwarp with a partial mask is not supported");
    w.barrier->arrive_and_wait();
}

// The four shuffles, with CUDA's rules for `width` (sub-warps of width lanes; a source outside
// the caller's sub-warp gives the caller its own value, except that xor may read lower sub-warps).
template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    const unsigned lane = cuda_emu::thread_rank % 32;
    if (!cuda_emu::valid_width("__shfl_sync", width)) return var;
    const unsigned base = lane & ~unsigned(width - 1);
    return cuda_emu::shuffle("__shfl_sync", mask, var, base + (unsigned(src_lane) & unsigned(width - 1)));
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    const unsigned lane = cuda_emu::thread_rank % 32;
    if (!cuda_emu::valid_width("__shfl_up_sync", width)) return var;
    const unsigned in_segment = lane & unsigned(width - 1);
    return cuda_emu::shuffle("__shfl_up_sync", mask, var, in_segment >= delta ? lane - delta : lane);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    const unsigned lane = cuda_emu::thread_rank % 32;
    if (!cuda_emu::valid_width("__shfl_down_sync", width)) return var;
    const unsigned in_segment = lane & unsigned(width - 1);
    return cuda_emu::shuffle("__shfl_down_sync", mask, var, in_segment + delta < unsigned(width) ? lane + delta : lane);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    const unsigned lane = cuda_emu::thread_rank % 32;
    if (!cuda_emu::valid_width("__shfl_xor_sync", width)) return var;
    const unsigned source = lane ^ unsigned(lane_mask);
    const unsigned last_of_segment = (lane & ~unsigned(width - 1)) + unsigned(width - 1);
    return cuda_emu::shuffle("__shfl_xor_sync", mask, var, source <= last_of_segment ? source : lane);
}

// ---- atomics, loads and exactly-rounded arithmetic -------------------------------------------
template <class T>
T atomicAdd(T* address, T value) {
    static_assert(std::is_arithmetic_v<T>, "cuda_emu: atomicAdd supports int, unsigned, float and double");
    return std::atomic_ref<T>(*address).fetch_add(value);
}
template <class T>
T __ldg(const T* address) { return *address; }
// __fmul_rn / __fadd_rn round each operation on its own: nvcc never fuses them into an FMA. The
// emulator is built with -ffp-contract=off, so plain * and + are never fused here either.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

// ---- what is not emulated fails to build, naming the feature ---------------------------------
#define CUDA_EMU_UNSUPPORTED(feature) \
    ([]() -> unsigned { static_assert(false, "cuda_emu: " feature " is not supported by the CPU emulator"); return 0u; }())
#define __ballot_sync(...) CUDA_EMU_UNSUPPORTED("__ballot_sync")
#define __any_sync(...) CUDA_EMU_UNSUPPORTED("__any_sync")
#define __all_sync(...) CUDA_EMU_UNSUPPORTED("__all_sync")
#define __activemask(...) CUDA_EMU_UNSUPPORTED("__activemask")
#define __match_any_sync(...) CUDA_EMU_UNSUPPORTED("__match_any_sync")
#define __match_all_sync(...) CUDA_EMU_UNSUPPORTED("__match_all_sync")
#define __reduce_add_sync(...) CUDA_EMU_UNSUPPORTED("__reduce_add_sync")
#define __reduce_min_sync(...) CUDA_EMU_UNSUPPORTED("__reduce_min_sync")
#define __reduce_max_sync(...) CUDA_EMU_UNSUPPORTED("__reduce_max_sync")
#define __syncthreads_count(...) CUDA_EMU_UNSUPPORTED("__syncthreads_count")
#define __syncthreads_and(...) CUDA_EMU_UNSUPPORTED("__syncthreads_and")
#define __syncthreads_or(...) CUDA_EMU_UNSUPPORTED("__syncthreads_or")

// ---- dynamic shared memory ---------------------------------------------------------------------
// `extern __shared__ T name[];` cannot be spelled with a macro (`extern static` is no C++), so the
// build step (minift/cuda/emulator.py) rewrites that one declaration into this macro: a pointer to the
// launch's dynamic buffer (blocks run one at a time, so one buffer serves every block).
#define CUDA_EMU_DYNAMIC_SHARED(T, name) T* const name = reinterpret_cast<T*>(cuda_emu::dynamic_shared)

// ---- the launch interface Python calls through ctypes -------------------------------------------
namespace cuda_emu {

// A parameter's type as a short code ("f32*", "i32" ...), so Python can check what it packs.
template <class T> constexpr const char* scalar_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return "f32";
    else if constexpr (std::is_same_v<U, double>) return "f64";
    else if constexpr (std::is_same_v<U, std::int32_t>) return "i32";
    else if constexpr (std::is_same_v<U, std::uint32_t>) return "u32";
    else if constexpr (std::is_same_v<U, std::int64_t>) return "i64";
    else if constexpr (std::is_same_v<U, std::uint64_t>) return "u64";
    else if constexpr (std::is_same_v<U, std::uint8_t>) return "u8";
    else if constexpr (sizeof(U) == 2 && std::is_trivially_copyable_v<U>) return "f16";  // __half
    else static_assert(sizeof(U) == 0, "cuda_emu: kernel parameter type not supported by the launcher");
}
template <class T> std::string param_code() {
    if constexpr (std::is_pointer_v<T>) return std::string(scalar_code<std::remove_pointer_t<T>>()) + "*";
    else return scalar_code<T>();
}

struct Kernel {
    std::string signature;                  // "f32*,f32*,i32,f32"
    std::function<void(void**)> call;       // args[i] points at the value of parameter i
};
inline std::map<std::string, Kernel>& registry() { static std::map<std::string, Kernel> kernels; return kernels; }
inline std::mutex launch_mutex;  // one launch at a time, like one CUDA stream

template <class... A>
struct Registration {
    Registration(const char* name, void (*kernel)(A...)) {
        std::string signature;
        ((signature += (signature.empty() ? "" : ",") + param_code<A>()), ...);
        registry()[name] = {signature, [kernel](void** args) { call(kernel, args, std::index_sequence_for<A...>{}); }};
    }
    template <std::size_t... I>
    static void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
        kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
    }
};

}  // namespace cuda_emu

#define CUDA_EMU_REGISTER(kernel) static cuda_emu::Registration cuda_emu_registration_##kernel{#kernel, &kernel};

extern "C" const char* cuda_emu_signature(const char* name) {
    auto found = cuda_emu::registry().find(name);
    return found == cuda_emu::registry().end() ? nullptr : found->second.signature.c_str();
}

extern "C" const char* cuda_emu_error() { return cuda_emu::first_error.c_str(); }

// Returns 0, or -1 with the reason in cuda_emu_error(). Python checks the launch before calling;
// these checks repeat the hardware's limits so that the emulator never accepts what a GPU refuses.
extern "C" int cuda_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                               unsigned by, unsigned bz, std::size_t dynamic_bytes, void** args) {
    std::lock_guard<std::mutex> lock(cuda_emu::launch_mutex);
    cuda_emu::first_error.clear();
    auto found = cuda_emu::registry().find(name);
    if (found == cuda_emu::registry().end()) cuda_emu::fail(std::string("no kernel named ") + name);
    else if (gx * gy * gz == 0 || bx * by * bz == 0) cuda_emu::fail("empty grid or block");
    else if (bx * by * bz > 1024 || bz > 64 || gy > 65535 || gz > 65535) cuda_emu::fail("grid or block too large");
    else if (dynamic_bytes > cuda_emu::kMaxDynamicShared) cuda_emu::fail("more than 48 KiB of dynamic shared memory");
    else {
        const auto& kernel = found->second;
        cuda_emu::BlockRunner(dim3(gx, gy, gz), dim3(bx, by, bz), dynamic_bytes, [&] { kernel.call(args); }).run();
    }
    return cuda_emu::first_error.empty() ? 0 : -1;
}
