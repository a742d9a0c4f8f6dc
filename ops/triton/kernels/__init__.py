"""Triton kernel sources of the ``triton`` backends, one module per op.

Importing one of these modules imports triton and decorates its kernels, so ``TRITON_INTERPRET`` is read then; the
backend modules in :mod:`zoo.ops.triton` import them on first use, never at ``import zoo``.

Every kernel and ``@triton.jit`` helper is a module-level name, and kernels refer to helpers, ``tl`` and integer
constants only as globals (no closures, no float globals): inductor, which launches the kernels of a
``torch.library.triton_op`` from its own generated code, copies a kernel's source together with the ``@triton.jit``
globals its code names, and Triton's interpreter resolves names through the module globals too.
``tests/ops/test_triton_helpers.py`` checks this for every module here. Float scalar arguments are cast to float32
on entry: inductor's launcher passes Python floats as fp64 (Triton's own launcher as fp32), and an fp64 scale would
turn the softmax statistics into fp64 loop-carried values, which Triton rejects.
"""
