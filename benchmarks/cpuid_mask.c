/* Make this process see an AVX2-only x86 CPU: CPUID answers with AVX-512, VNNI and AMX cleared.
 *
 * Used by benchmarks/common.py (mask_cpuid_to_avx2) so that every library in a benchmark process, not only
 * nanoopt's Numba code, takes the code path an AVX2-only machine would take: NumPy's SIMD dispatch, OpenBLAS,
 * PyTorch (cpuinfo -> FBGEMM, oneDNN, ATen) and ONNX Runtime (MLAS), which read the CPU's features with the
 * CPUID instruction and have no switch of their own.
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0), kernel 4.12+, on CPUs that list "cpuid_fault")
 * turns every CPUID executed by this thread, and by the threads it creates later, into a SIGSEGV. The handler
 * below recognises the instruction (0F A2 at the faulting address), runs the real CPUID with faulting briefly
 * off, clears the feature bits in the answer, writes it into the saved registers and resumes after the
 * instruction. Any other SIGSEGV goes to the handler installed before (or the default action). This is the
 * technique of rr's CPUID emulation; the feature bits are those of the Intel SDM, vol. 2A, CPUID, leaves 07H
 * and 0DH.
 *
 * Threads created before the call (e.g. an OpenBLAS pool started by importing NumPy) keep the real CPUID:
 * call it first thing in the process. Only CPUID is masked: XGETBV still reports the AVX-512 register state
 * as enabled, which code reads only after CPUID said AVX-512F is there.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012

/* leaf 7, subleaf 0 */
#define EBX7_CLEARED ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) \
                      | (1u << 31)) /* AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL */
#define ECX7_CLEARED ((1u << 1) | (1u << 6) | (1u << 8) | (1u << 9) | (1u << 10) | (1u << 11) | (1u << 12) \
                      | (1u << 14)) /* AVX512_VBMI, VBMI2, GFNI, VAES, VPCLMULQDQ, AVX512_VNNI, BITALG, VPOPCNTDQ */
#define EDX7_CLEARED ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
                     /* AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
/* leaf 7, subleaf 1 */
#define EAX71_CLEARED ((1u << 4) | (1u << 5) | (1u << 23)) /* AVX-VNNI, AVX512_BF16, AVX-IFMA */
#define EDX71_CLEARED ((1u << 4) | (1u << 5) | (1u << 10)) /* AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16 */
/* leaf 0DH, subleaf 0: the state components the CPU supports (opmask, ZMM_Hi256, Hi16_ZMM, AMX) */
#define EAX13_CLEARED ((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18))

static struct sigaction previous;
static volatile long emulated;

static long set_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void masked_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]) {
    uint32_t a = leaf, b, c = subleaf, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    if (leaf == 7 && subleaf == 0) {
        b &= ~EBX7_CLEARED;
        c &= ~ECX7_CLEARED;
        d &= ~EDX7_CLEARED;
    } else if (leaf == 7 && subleaf == 1) {
        a &= ~EAX71_CLEARED;
        d &= ~EDX71_CLEARED;
    } else if (leaf == 13 && subleaf == 0) {
        a &= ~EAX13_CLEARED;
    }
    out[0] = a, out[1] = b, out[2] = c, out[3] = d;
}

static void on_segv(int signal, siginfo_t *info, void *context) {
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *pc = (const unsigned char *)regs[REG_RIP];
    if (pc[0] == 0x0F && pc[1] == 0xA2) {
        uint32_t out[4];
        set_faulting(0);
        masked_cpuid((uint32_t)regs[REG_RAX], (uint32_t)regs[REG_RCX], out);
        set_faulting(1);
        regs[REG_RAX] = out[0], regs[REG_RBX] = out[1], regs[REG_RCX] = out[2], regs[REG_RDX] = out[3];
        regs[REG_RIP] += 2;
        emulated++;
        return;
    }
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(signal, info, context);
    } else if (previous.sa_handler != SIG_IGN && previous.sa_handler != SIG_DFL) {
        previous.sa_handler(signal);
    } else {  /* not a CPUID: put the default action back; the instruction faults again and ends the process */
        sigaction(SIGSEGV, &previous, NULL);
    }
}

/* Returns 0 on success, 1 if the kernel or CPU cannot fault on CPUID, 2 if the handler could not be set. */
int nanoopt_mask_cpuid_to_avx2(void) {
    if (syscall(SYS_arch_prctl, ARCH_GET_CPUID, 0) < 0) return 1;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &previous) != 0) return 2;
    if (set_faulting(1) != 0) {
        sigaction(SIGSEGV, &previous, NULL);
        return 1;
    }
    return 0;
}

/* How many CPUID instructions were answered with the masked features so far. */
long nanoopt_cpuid_emulated(void) { return emulated; }

/* CPUID as this process sees it: the instruction itself (answered by the handler once the mask is on). */
void nanoopt_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]) {
    uint32_t a = leaf, b, c = subleaf, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    out[0] = a, out[1] = b, out[2] = c, out[3] = d;
}
