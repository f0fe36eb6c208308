/* Atomics and futexes on shared memory, for msight_fast/_ext/_shm.pyx.
 *
 * Every word another process reads or writes goes through these: C11-style __atomic builtins on
 * naturally aligned words (lock-free on every platform we build for), and futexes without
 * FUTEX_PRIVATE_FLAG, because the waiters are in other processes mapping the same file. */
#ifndef MSF_SHM_SYS_H
#define MSF_SHM_SYS_H
#include <stdint.h>
#include <errno.h>
#include <time.h>
#include <string.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MSF_HAVE_FUTEX 1
#else
#define MSF_HAVE_FUTEX 0
#endif

static inline uint64_t msf_ld64(const uint8_t* p) { return __atomic_load_n((const uint64_t*)p, __ATOMIC_ACQUIRE); }
static inline uint64_t msf_ld64_sc(const uint8_t* p) { return __atomic_load_n((const uint64_t*)p, __ATOMIC_SEQ_CST); }
static inline void msf_st64(uint8_t* p, uint64_t v) { __atomic_store_n((uint64_t*)p, v, __ATOMIC_RELEASE); }
static inline void msf_st64_sc(uint8_t* p, uint64_t v) { __atomic_store_n((uint64_t*)p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t msf_ld32(const uint8_t* p) { return __atomic_load_n((const uint32_t*)p, __ATOMIC_ACQUIRE); }
static inline uint32_t msf_ld32_sc(const uint8_t* p) { return __atomic_load_n((const uint32_t*)p, __ATOMIC_SEQ_CST); }
static inline void msf_st32(uint8_t* p, uint32_t v) { __atomic_store_n((uint32_t*)p, v, __ATOMIC_RELEASE); }
static inline uint32_t msf_add32(uint8_t* p, uint32_t v) { return __atomic_add_fetch((uint32_t*)p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t msf_sub32(uint8_t* p, uint32_t v) { return __atomic_sub_fetch((uint32_t*)p, v, __ATOMIC_SEQ_CST); }
static inline int msf_cas32(uint8_t* p, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n((uint32_t*)p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline int msf_cas64(uint8_t* p, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t*)p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline void msf_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline void msf_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A copy into a slot. Large ones use non-temporal stores on x86-64: the slots rotate, so the
 * destination is never in cache, and ordinary stores first read every line they write
 * (benchmarks/shm_costs.py: 6.2 MB into rotating slots, 684-746 us with memcpy, 359-389 us streamed).
 * The sfence orders the streamed stores before the commit that publishes them. */
#define MSF_STREAM_MIN (256 * 1024)
static inline void msf_copy(uint8_t* dst, const uint8_t* src, size_t n) {
#if defined(__x86_64__)
    if (n >= MSF_STREAM_MIN) {
        while ((uintptr_t)dst & 15) { *dst++ = *src++; n--; }
        size_t blocks = n / 64;
        for (size_t i = 0; i < blocks; i++) {
            __m128i a = _mm_loadu_si128((const __m128i*)(src));
            __m128i b = _mm_loadu_si128((const __m128i*)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i*)(src + 32));
            __m128i d = _mm_loadu_si128((const __m128i*)(src + 48));
            _mm_stream_si128((__m128i*)(dst), a);
            _mm_stream_si128((__m128i*)(dst + 16), b);
            _mm_stream_si128((__m128i*)(dst + 32), c);
            _mm_stream_si128((__m128i*)(dst + 48), d);
            src += 64;
            dst += 64;
        }
        _mm_sfence();
        memcpy(dst, src, n % 64);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* 0: woken (or the word had changed); ETIMEDOUT; EINTR; another errno. */
static inline int msf_futex_wait(uint8_t* p, uint32_t expected, double timeout_s) {
#if MSF_HAVE_FUTEX
    struct timespec ts;
    if (timeout_s < 0) timeout_s = 0;
    ts.tv_sec = (time_t)timeout_s;
    ts.tv_nsec = (long)((timeout_s - (double)ts.tv_sec) * 1e9);
    if (syscall(SYS_futex, (uint32_t*)p, FUTEX_WAIT, expected, &ts, NULL, 0) == 0) return 0;
    return errno == EAGAIN ? 0 : errno;
#else
    (void)p; (void)expected; (void)timeout_s;
    return ENOSYS;
#endif
}

static inline int msf_futex_wake(uint8_t* p, int n) {
#if MSF_HAVE_FUTEX
    return (int)syscall(SYS_futex, (uint32_t*)p, FUTEX_WAKE, n, NULL, NULL, 0);
#else
    (void)p; (void)n;
    return -1;
#endif
}
#endif
