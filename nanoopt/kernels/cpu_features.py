"""Which x86 features the kernels may use in this process, decided at run time and without compiling anything.

The x86 intrinsics compile only when LLVM targets a CPU that has them; for any other target LLVM aborts the whole
process, which no ``try`` can catch. So before any kernel that names an x86 instruction is compiled, the dispatch
asks this module. A feature is usable when all three agree:

* the CPU executes it (``llvmlite.binding.get_host_cpu_features()``);
* Numba compiles for a target that has it (the host CPU unless ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` say
  otherwise; ``generic`` means none; ``NUMBA_ENABLE_AVX=0`` removes the AVX features);
* ``NANOOPT_CPU_FEATURES`` allows it: a comma-separated list of :data:`CPU_FEATURES` (``avx2``: the AVX2 kernel,
  never VNNI; ``none``: the portable kernels). It can only take features away.

Two more switches, read when asked: ``NANOOPT_DISABLE_AVX2=1`` turns every AVX2 kernel off (to exercise the
portable fallback) and ``NANOOPT_DISABLE_AVX_VNNI=1`` keeps the plain AVX2 int8 kernel where VNNI exists.

>>> usable_features() <= set(CPU_FEATURES)
True
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import llvmlite.binding
from numba.core import codegen, config

__all__ = [
    "CPU_FEATURES",
    "DISABLE_ENV",
    "DISABLE_VNNI_ENV",
    "FEATURES_ENV",
    "allowed_features",
    "avx2_kernel_works",
    "kernel_s8_for",
    "select_features",
    "switched_on",
    "target_has_avx2",
    "target_has_avx_vnni",
    "usable_features",
]

DISABLE_ENV = "NANOOPT_DISABLE_AVX2"  # set to 1: no AVX2 kernel is available
DISABLE_VNNI_ENV = "NANOOPT_DISABLE_AVX_VNNI"  # set to 1: the int8 GEMM is the plain AVX2 kernel
FEATURES_ENV = "NANOOPT_CPU_FEATURES"  # e.g. "avx2" or "none": the CPU features the kernels may use (unset: all)
CPU_FEATURES = ("avx2", "avxvnni", "avx512vnni", "avx512vl", "avx512f", "avx512bw")  # the x86 features the
# kernels can use (the last two, with avx512vnni, by the 512-bit kernels of nanoopt.kernels.avx512)


def switched_on(variable: str) -> bool:
    """True if the environment variable is set to anything but ``""`` or ``"0"``.

    >>> switched_on("NANOOPT_SURELY_UNSET_VARIABLE")
    False
    """
    return os.environ.get(variable, "").strip() not in ("", "0")


def allowed_features(value: str | None = None) -> frozenset[str] | None:
    """The CPU features that ``NANOOPT_CPU_FEATURES`` (or ``value``) lets the kernels use; ``None``: no limit.

    The variable is a comma-separated list of names from :data:`CPU_FEATURES` (LLVM's spelling, any case), or
    ``none`` for none of them (the portable kernels); unset or empty means every feature the CPU and Numba's
    target have. It can only take features away: a feature it names that the CPU lacks is still not used.
    Anything else is a ``ValueError`` naming the variable, the word it did not know and the names it takes.

    >>> sorted(allowed_features("avx2, AVX512VNNI"))
    ['avx2', 'avx512vnni']
    >>> allowed_features("none"), allowed_features("") is None
    (frozenset(), True)
    """
    value = os.environ.get(FEATURES_ENV, "") if value is None else value
    if not value.strip():
        return None
    names = [name.strip().lower() for name in value.split(",")]
    if names == ["none"]:
        return frozenset()
    for name in names:
        if name not in CPU_FEATURES:
            raise ValueError(f"{FEATURES_ENV} must be a comma-separated list of {', '.join(CPU_FEATURES)} (or "
                             f"'none'), got {value!r} (unknown: {name!r})")
    return frozenset(names)


def select_features(host: dict[str, bool], target: str, allowed: frozenset[str] | None) -> frozenset[str]:
    """The features of :data:`CPU_FEATURES` the kernels may use: those the CPU executes (``host``, as
    ``llvmlite.binding.get_host_cpu_features()``), LLVM compiles for (``target``, Numba's feature string
    ``"+avx2,-avx512f,..."``; empty for the generic target) and ``allowed`` permits (:func:`allowed_features`).

    >>> sorted(select_features({"avx2": True, "avxvnni": True}, "+avx2,+avxvnni,-avx512vnni", None))
    ['avx2', 'avxvnni']
    >>> sorted(select_features({"avx2": True, "avxvnni": False}, "+avx2,+avxvnni", frozenset({"avx2", "avxvnni"})))
    ['avx2']
    """
    enabled = {item[1:] for item in target.split(",") if item.startswith("+")}
    return frozenset(feature for feature in CPU_FEATURES if host.get(feature, False) and feature in enabled
                     and (allowed is None or feature in allowed))


def kernel_s8_for(features: frozenset[str]) -> str:
    """The int8 GEMM that runs with these usable features: ``"avx-vnni"`` (256-bit ``vpdpbusd``: AVX-VNNI, or
    AVX512-VNNI with AVX512-VL, and AVX2), ``"avx2"``, or ``"portable"`` (the Numba kernels, no intrinsics).

    >>> kernel_s8_for(frozenset({"avx2", "avx512vnni"})), kernel_s8_for(frozenset({"avxvnni"}))
    ('avx2', 'portable')
    """
    if "avx2" not in features:
        return "portable"
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        return "avx-vnni"
    return "avx2"


def usable_features() -> frozenset[str]:
    """:func:`select_features` for this process (see the module docstring), checked without compiling anything.

    A malformed ``NANOOPT_CPU_FEATURES`` raises ``ValueError``. Off x86-64, or if llvmlite cannot say, the answer
    is no feature.

    >>> usable_features() <= set(CPU_FEATURES)
    True
    """
    allowed = allowed_features()  # outside the try: a malformed variable is an error, not "no features"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return frozenset()
    try:
        host = dict(llvmlite.binding.get_host_cpu_features())
        if str(config.CPU_NAME).lower() == "generic":
            target = ""
        else:
            target = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
        return select_features(host, target, allowed)
    except Exception:  # an unusual llvmlite/Numba: no AVX2 kernels rather than a crash
        return frozenset()


def target_has_avx2() -> bool:
    """True if this CPU executes AVX2, Numba compiles for a target with AVX2 and ``NANOOPT_CPU_FEATURES`` allows
    it (checked without compiling).

    >>> isinstance(target_has_avx2(), bool)
    True
    """
    return "avx2" in usable_features()


def target_has_avx_vnni() -> bool:
    """True if AVX2 and 256-bit ``vpdpbusd`` are usable: AVX-VNNI, or AVX512-VNNI with AVX512-VL.

    >>> isinstance(target_has_avx_vnni(), bool)
    True
    """
    return kernel_s8_for(usable_features()) == "avx-vnni"


def avx2_kernel_works(self_test: Callable[[], bool]) -> bool:
    """The availability rule of every AVX2 kernel module: False when ``NANOOPT_DISABLE_AVX2`` is on or the target
    has no usable AVX2 (both checked without compiling), else whether ``self_test()`` -- which compiles the kernel
    and compares a small product with NumPy -- passes. Never an exception: any failure means "use the portable
    kernels".

    >>> avx2_kernel_works(lambda: True) == target_has_avx2() and not switched_on(DISABLE_ENV)
    True
    """
    if switched_on(DISABLE_ENV):
        return False
    try:
        return target_has_avx2() and self_test()
    except Exception:  # any failure to type or compile the kernels means: use the portable path
        return False
