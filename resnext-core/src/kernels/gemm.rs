//! A safe, bounds-checked wrapper over the `gemm` crate's single-precision matrix product.

/// A strided, read-only view of a matrix stored in a slice.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Backing storage.
    pub data: &'a [f32],
    /// Distance between consecutive rows.
    pub row_stride: usize,
    /// Distance between consecutive columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `rows × cols` matrix, seen as `cols × rows`.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "sgemm: {what} view {rows}x{cols} exceeds its slice of {} elements",
            self.data.len()
        );
    }
}

/// `c = (accumulate ? c : 0) + a · b` where `a` is `m × k`, `b` is `k × n` and `c` is a
/// row-major `m × n` matrix with row stride `ldc`.
///
/// `parallel` lets the GEMM split its work across the rayon pool; pass `false` when the
/// caller already runs one product per thread.
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: `c` holds initialised values, so reading it (when accumulating) is sound.
    unsafe {
        product(
            m,
            n,
            k,
            a,
            b,
            super::as_uninit(c),
            ldc,
            accumulate,
            parallel,
        )
    }
}

/// `c = a · b` ([`sgemm`] without accumulation) into possibly uninitialised memory: writes
/// every value of the `m × n` block of `c` and reads none.
pub fn sgemm_write(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [std::mem::MaybeUninit<f32>],
    ldc: usize,
    parallel: bool,
) {
    // SAFETY: without accumulation the product reads nothing of `c`.
    unsafe { product(m, n, k, a, b, c, ldc, false, parallel) }
}

/// `a · b` as a new row-major `m × n` buffer ([`sgemm_write`] into new memory).
pub fn sgemm_new(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    parallel: bool,
) -> Vec<f32> {
    // SAFETY: the product writes all `m` rows of `n` values.
    unsafe { super::written(m * n, |c| sgemm_write(m, n, k, a, b, c, n, parallel)) }
}

/// The product behind [`sgemm`] and [`sgemm_write`].
///
/// # Safety
/// When `accumulate`, the `m × n` block of `c` is initialised.
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [std::mem::MaybeUninit<f32>],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * ldc + n <= c.len(),
        "sgemm: output {m}x{n} (ldc {ldc}) exceeds its slice of {}",
        c.len()
    );
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                c[row * ldc..row * ldc + n].fill(std::mem::MaybeUninit::new(0.0));
            }
        }
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    let par = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: all three views were bounds-checked above for the exact extents gemm reads
    // and writes; `c` is borrowed mutably so it cannot alias `a` or `b`; gemm reads `c`
    // only when `accumulate` (its `read_dst`), and the caller guarantees it is then
    // initialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().cast::<f32>(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_loops_for_all_layouts() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32).sin()).collect();
        let mut want = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        let mut c = vec![1.0f32; m * n];
        sgemm(
            m,
            n,
            k,
            MatRef::row_major(&a, k),
            MatRef::row_major(&b, n),
            &mut c,
            n,
            false,
            true,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        // a stored transposed (k x m), accumulate on top of ones.
        let mut at = vec![0.0f32; k * m];
        for i in 0..m {
            for p in 0..k {
                at[p * m + i] = a[i * k + p];
            }
        }
        let mut c = vec![1.0f32; m * n];
        sgemm(
            m,
            n,
            k,
            MatRef::transposed(&at, m),
            MatRef::row_major(&b, n),
            &mut c,
            n,
            true,
            false,
        );
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (y + 1.0)).abs() < 1e-5);
        }
    }
}
