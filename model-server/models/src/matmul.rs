//! Row-major f32 matrix products on the CPU through the `gemm` crate (the one candle's CPU
//! backend calls), for fused ops that compute products on raw buffers.

/// `C = A · B` for `A` `[m, k]` and `B` `[k, n]` given by (row, column) strides, so that
/// either may be a transposed view; `C` is row-major.
pub(crate) struct Product<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lhs: &'a [f32],
    /// (row stride, column stride) of `A`.
    pub lhs_strides: (usize, usize),
    pub rhs: &'a [f32],
    /// (row stride, column stride) of `B`.
    pub rhs_strides: (usize, usize),
}

impl Product<'_> {
    /// `A · B` into a new row-major `[m, n]`.
    pub fn run(&self) -> candle_core::Result<Vec<f32>> {
        let mut dst = vec![0f32; self.m * self.n];
        self.run_into(&mut dst, false)?;
        Ok(dst)
    }

    /// `dst = A · B`, or `dst += A · B` with `accumulate`, for a row-major `[m, n]` `dst`.
    pub fn run_into(&self, dst: &mut [f32], accumulate: bool) -> candle_core::Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        // Every element of A and B the product reads must lie inside the slices: that is
        // what makes the raw-pointer call below sound.
        let last = |(rs, cs): (usize, usize), rows: usize, cols: usize| {
            (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
        };
        if m * k > 0 && last(self.lhs_strides, m, k) >= self.lhs.len()
            || k * n > 0 && last(self.rhs_strides, k, n) >= self.rhs.len()
        {
            candle_core::bail!("product: operands smaller than [{m}, {k}] · [{k}, {n}]");
        }
        if dst.len() != m * n {
            candle_core::bail!("product: destination of {} for [{m}, {n}]", dst.len());
        }
        if m * n * k == 0 {
            if !accumulate {
                dst.fill(0.0);
            }
            return Ok(());
        }
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: dst is [m, n] row-major; the bounds of A and B were checked above.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                self.lhs.as_ptr(),
                self.lhs_strides.1 as isize,
                self.lhs_strides.0 as isize,
                self.rhs.as_ptr(),
                self.rhs_strides.1 as isize,
                self.rhs_strides.0 as isize,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok(())
    }
}
