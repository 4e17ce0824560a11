"""Float kernels of the autograd: im2col / col2im, pooling, GELU and softmax, each a NumPy reference beside a Numba
version that equals it bit for bit.

They sit in the kernels layer (layer 1 of ``docs/architecture.md``) but in a package of their own, apart from the
integer kernels of :mod:`nanoopt.kernels`: the autograd (``nanoopt.ops``) imports them, and importing a module of
:mod:`nanoopt.kernels` runs its dispatcher, which loads every integer backend. This package imports nothing.

* :mod:`nanoopt.float_kernels.im2col` -- im2col and its adjoint col2im for float convolution;
* :mod:`nanoopt.float_kernels.pooling` -- max pooling forward and backward;
* :mod:`nanoopt.float_kernels.gelu` -- the exact GELU and its derivative;
* :mod:`nanoopt.float_kernels.softmax` -- a row softmax with a fixed summation order;
* :mod:`nanoopt.float_kernels.attention_heads` and :mod:`nanoopt.float_kernels.residual` -- a linear layer's bias
  added in the pass that follows its product (the heads' layout, the residual addition), for the GPT window.
* :mod:`nanoopt.float_kernels.gpt_step` -- one token of a float32 GPT (every block, its KV cache, the head) in one
  call, for the cached steps of :meth:`nanoopt.models_gpt.GPT.generate`.
"""
