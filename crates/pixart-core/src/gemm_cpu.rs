//! One single-threaded f32 matrix product on strided operands, the form the CPU kernels of this
//! crate call from inside their own parallel tasks (the `gemm` crate, whose AVX-512 or AVX2
//! micro-kernels are chosen at run time).

/// A read-only `rows × cols` f32 operand: element `(r, c)` at `ptr + r·row_stride + c·col_stride`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Operand {
    /// A row-major operand whose rows are `row_stride` apart.
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self { ptr, row_stride, col_stride: 1 }
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), `lhs` `m × k`, `rhs` `k × n`,
/// `dst` `m × n` row-major with rows `dst_row_stride` apart, on the calling thread.
///
/// # Safety
/// Every element the shapes and strides address must be inside its allocation, and `dst`'s
/// elements must not be written by anyone else during the call.
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
