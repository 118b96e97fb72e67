// The emulator's launcher: compiles the CUDA kernel source (FV_EMU_SOURCE) for the
// host through shim.h and exports, for every kernel named in FV_EMU_TEMPLATES
// (instantiated for float and double, named as the backend's NVRTC name
// expressions, "bias_act<float>") and FV_EMU_PLAIN, its C signature and a launch
// entry taking CUDA's kernelParams convention (an array of pointers to the values).
#include "shim.h"

#include <barrier>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's default limit on dynamic shared memory per block (more needs an opt-in).
constexpr std::size_t FV_EMU_SMEM_BYTES = 48 * 1024;
alignas(16) unsigned char fv_smem[FV_EMU_SMEM_BYTES];

namespace fv_emu {
thread_local ThreadCtx ctx;
static std::barrier<>* block_barrier = nullptr;
void syncthreads() { block_barrier->arrive_and_wait(); }
}  // namespace fv_emu

#include FV_EMU_SOURCE

namespace {

template <class T>
std::string tname() {
    if constexpr (std::is_pointer_v<T>) {
        return tname<std::remove_cv_t<std::remove_pointer_t<T>>>() + "*";
    } else if constexpr (std::is_same_v<T, float>) {
        return "float";
    } else if constexpr (std::is_same_v<T, double>) {
        return "double";
    } else if constexpr (std::is_same_v<T, int>) {
        return "int";
    } else if constexpr (std::is_same_v<T, long long>) {
        return "long long";
    } else if constexpr (std::is_same_v<T, unsigned int>) {
        return "unsigned int";
    } else if constexpr (std::is_same_v<T, unsigned long long>) {
        return "unsigned long long";
    } else {
        static_assert(sizeof(T) == 0, "kernel argument type unknown to the emulator");
    }
}

struct Entry {
    std::string name, signature;
    std::function<void(void**)> call;
};

template <class... A, std::size_t... I>
void call_with(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <class... A>
Entry make_entry(const char* name, void (*k)(A...)) {
    std::string sig;
    ((sig += (sig.empty() ? "" : ","), sig += tname<A>()), ...);
    return Entry{name, sig, [k](void** args) { call_with(k, args, std::index_sequence_for<A...>{}); }};
}

std::vector<Entry>& registry() {
    static std::vector<Entry> v = [] {
        std::vector<Entry> r;
#define X(k)                                         \
    r.push_back(make_entry(#k "<float>", &k<float>)); \
    r.push_back(make_entry(#k "<double>", &k<double>));
        FV_EMU_TEMPLATES
#undef X
#define X(k) r.push_back(make_entry(#k, &k));
        FV_EMU_PLAIN
#undef X
        return r;
    }();
    return v;
}

int fail(char* err, std::size_t len, const char* msg) {
    std::snprintf(err, len, "%s", msg);
    return 1;
}

}  // namespace

extern "C" {

int fv_emu_count() { return (int)registry().size(); }
const char* fv_emu_name(int i) { return registry().at(i).name.c_str(); }
const char* fv_emu_signature(int i) { return registry().at(i).signature.c_str(); }
std::size_t fv_emu_smem_limit() { return FV_EMU_SMEM_BYTES; }

// Runs kernel `i` on grid[3] x block[3] threads with `smem` bytes of dynamic shared
// memory. Returns 0, or 1 with the reason in err when the launch breaks CUDA's limits.
int fv_emu_launch(int i, const unsigned int* grid, const unsigned int* block, std::size_t smem, void** args,
                  char* err, std::size_t errlen) {
    const dim3 g{grid[0], grid[1], grid[2]}, b{block[0], block[1], block[2]};
    if (!g.x || !g.y || !g.z || !b.x || !b.y || !b.z) return fail(err, errlen, "a grid or block dimension is 0");
    if (b.x > 1024 || b.y > 1024 || b.z > 64 || (unsigned long long)b.x * b.y * b.z > 1024)
        return fail(err, errlen, "more than 1024 threads per block (or a block dimension over its limit)");
    if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) return fail(err, errlen, "grid dimension over its limit");
    if (smem > FV_EMU_SMEM_BYTES) return fail(err, errlen, "more than 48 KiB of dynamic shared memory");
    const Entry& e = registry().at(i);
    const unsigned nthreads = b.x * b.y * b.z;
    std::barrier<> pool(nthreads);  // between blocks
    std::unique_ptr<std::barrier<>> kbar;
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        threads.emplace_back([&, t] {
            fv_emu::ctx.block_dim = b;
            fv_emu::ctx.grid_dim = g;
            fv_emu::ctx.thread = dim3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
            for (unsigned bz = 0; bz < g.z; ++bz)
                for (unsigned by = 0; by < g.y; ++by)
                    for (unsigned bx = 0; bx < g.x; ++bx) {
                        if (t == 0) {  // a fresh block: new barrier, shared memory poisoned (NaN bytes)
                            kbar = std::make_unique<std::barrier<>>(nthreads);
                            fv_emu::block_barrier = kbar.get();
                            std::memset(fv_smem, 0xFF, smem);
                        }
                        pool.arrive_and_wait();
                        fv_emu::ctx.block = dim3{bx, by, bz};
                        e.call(args);
                        kbar->arrive_and_drop();  // an exited thread no longer holds back __syncthreads
                        pool.arrive_and_wait();
                    }
        });
    }
    for (auto& th : threads) th.join();
    return 0;
}

}  // extern "C"
