"""Whether ``torch.compile`` can build CPU kernels here: TorchInductor compiles C++ and needs a C++ compiler."""

from __future__ import annotations


def missing_cpu_compiler() -> str | None:
    """``None`` when TorchInductor finds a C++ compiler, else a sentence saying what is missing and how to fix it.

    Uses TorchInductor's own search (``torch._inductor.config.cpp.cxx``, ``$CXX``), so the answer is the one
    ``torch.compile`` would reach at its first CPU kernel, without compiling anything.
    """
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as err:  # InvalidCxxCompiler, or an import error on an unusual build
        return (f"TorchInductor found no C++ compiler ({type(err).__name__}: {str(err).strip()[:200]}); install one "
                f"(e.g. apt-get install g++) or set $CXX")
    return None
