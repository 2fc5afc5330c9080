"""Type stub of the compiled kernel core ``unlock_fast._core`` (csrc/bindings.cpp).

Addresses are ints (``tensor.data_ptr()``); strides are in elements; dtype codes are those of
``ops.core.DTYPE_CODES`` (0 float32, 1 float16, 2 bfloat16, 3 float64). CUDA entry points take
the device index and a stream handle; in a build without CUDA they raise RuntimeError.

Every entry point raises ValueError, before it touches memory, for sizes and strides that are
inconsistent on their own (negative sizes or strides, zero widths, overflowing index
arithmetic, written rows that alias each other, a written buffer overlapping another buffer
of the call); a failing cuBLAS/cuSOLVER call raises RuntimeError naming it. The addresses
themselves cannot be checked: use the validated wrappers in :mod:`unlock_fast.ops` rather
than these functions.
"""

# -- build information -------------------------------------------------------------------------
cuda_compiled: bool
cuda_architectures: str  # e.g. "80,90"; empty without CUDA
openmp: bool
blas: str

def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...

# -- streaming moments -------------------------------------------------------------------------
def moments_accumulate_cpu(
    n: int,
    dx: int,
    dy: int,
    x: int,
    x_dtype: int,
    x_s0: int,
    x_s1: int,
    y: int,
    y_dtype: int,
    y_s0: int,
    y_s1: int,
    weight: int,
    weight_stride: int,
    shift_x: int,
    shift_y: int,
    sum_x: int,
    sum_y: int,
    gram_xx: int,
    gram_yy: int,
    gram_xy: int,
    upper_only: bool,
) -> None: ...
def moments_accumulate_cuda(
    n: int,
    dx: int,
    dy: int,
    x: int,
    x_dtype: int,
    x_s0: int,
    x_s1: int,
    y: int,
    y_dtype: int,
    y_s0: int,
    y_s1: int,
    weight: int,
    weight_stride: int,
    shift_x: int,
    shift_y: int,
    sum_x: int,
    sum_y: int,
    gram_xx: int,
    gram_yy: int,
    gram_xy: int,
    upper_only: bool,
    device: int,
    workspace: int,
    workspace_floats: int,
    stream: int,
) -> None: ...

# -- residual steering (positional arguments only) ---------------------------------------------
# A position outside [-1, seq) raises ValueError on the CPU; on CUDA the Python entry point
# checks before launch and the kernel leaves such a row alone; -1 leaves the row alone.
def steer_cpu(
    hidden: int,
    dtype: int,
    batch: int,
    seq: int,
    dim: int,
    stride_b: int,
    stride_s: int,
    positions: int,
    mask: int,
    mask_stride_b: int,
    mask_stride_s: int,
    vector: int,
    vector_stride_b: int,
    alpha: float,
    mode: int,
    /,
) -> None: ...
def steer_cuda(
    hidden: int,
    dtype: int,
    batch: int,
    seq: int,
    dim: int,
    stride_b: int,
    stride_s: int,
    positions: int,
    mask: int,
    mask_stride_b: int,
    mask_stride_s: int,
    vector: int,
    vector_stride_b: int,
    alpha: float,
    mode: int,
    device: int,
    stream: int,
    /,
) -> None: ...

# Per-token steering from persistent buffers (a serving engine's flattened batch): row i is
# steered with table[slots[i], layer] when 0 <= slots[i] < num_slots, else left alone.
def steer_tokens_cpu(
    hidden: int,
    residual: int,
    dtype: int,
    rows: int,
    dim: int,
    hidden_stride: int,
    residual_stride: int,
    table: int,
    num_slots: int,
    layers: int,
    layer: int,
    slots: int,
    alphas: int,
    modes: int,
    /,
) -> None: ...
def steer_tokens_cuda(
    hidden: int,
    residual: int,
    dtype: int,
    rows: int,
    dim: int,
    hidden_stride: int,
    residual_stride: int,
    table: int,
    num_slots: int,
    layers: int,
    layer: int,
    slots: int,
    alphas: int,
    modes: int,
    device: int,
    stream: int,
    /,
) -> None: ...

# -- randomized eigensolver / SVD ----------------------------------------------------------------
def rsvd_plan(
    symmetric: bool,
    rows: int,
    cols: int,
    k: int,
    oversample: int,
    n_iter: int,
    method: int,
    cuda: bool,
) -> tuple[int, bool]: ...
def rsvd_eigh_workspace_cpu(
    d: int, k: int, oversample: int, n_iter: int, dtype: int, method: int
) -> int: ...
def rsvd_eigh_cpu(
    a: int,
    d: int,
    k: int,
    oversample: int,
    n_iter: int,
    seed: int,
    dtype: int,
    method: int,
    values: int,
    vectors: int,
    workspace: int,
    workspace_bytes: int,
) -> None: ...
def rsvd_svd_workspace_cpu(
    rows: int, cols: int, k: int, oversample: int, n_iter: int, dtype: int, method: int
) -> int: ...
def rsvd_svd_cpu(
    m: int,
    rows: int,
    cols: int,
    k: int,
    oversample: int,
    n_iter: int,
    seed: int,
    dtype: int,
    method: int,
    u: int,
    s: int,
    vh: int,
    workspace: int,
    workspace_bytes: int,
) -> None: ...
def rsvd_eigh_workspace_cuda(
    d: int, k: int, oversample: int, n_iter: int, dtype: int, method: int, device: int
) -> int: ...
def rsvd_eigh_cuda(
    a: int,
    d: int,
    k: int,
    oversample: int,
    n_iter: int,
    seed: int,
    dtype: int,
    method: int,
    values: int,
    vectors: int,
    workspace: int,
    workspace_bytes: int,
    device: int,
    stream: int,
) -> None: ...
def rsvd_svd_workspace_cuda(
    rows: int,
    cols: int,
    k: int,
    oversample: int,
    n_iter: int,
    dtype: int,
    method: int,
    device: int,
) -> int: ...
def rsvd_svd_cuda(
    m: int,
    rows: int,
    cols: int,
    k: int,
    oversample: int,
    n_iter: int,
    seed: int,
    dtype: int,
    method: int,
    u: int,
    s: int,
    vh: int,
    workspace: int,
    workspace_bytes: int,
    device: int,
    stream: int,
) -> None: ...
