//! `x · W + b` as one CPU op (f32), forward and backward, for inputs `[..., in]`.
//!
//! Composed from candle ops an affine map is a reshape to rows, the matrix product, the bias
//! addition and a reshape back; backward adds, for each of those four nodes, the gradient into
//! a fresh zero tensor, so one layer's projection costs six passes over its output besides the
//! two products. Here the forward is the product and one bias pass over its result, and the
//! backward is the two products and one column sum, written straight into the three gradients.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::error::Result;
use crate::fused::{add_bias_in_place, contiguous, sum_rows_into};
use crate::matmul::Product;

/// How the weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`: GPT-2's `Conv1D`.
    InOut,
    /// `[out, in]`: `torch.nn.Linear`.
    OutIn,
}

struct Affine {
    layout: WeightLayout,
}

/// Rows, input width and output width of a call, checked against the weight and bias shapes.
fn dims_of(
    x: &Layout,
    weight: &Layout,
    bias: &Layout,
    layout: WeightLayout,
) -> candle_core::Result<(usize, usize, usize)> {
    let input = x.dims().last().copied().unwrap_or(0);
    let (a, b) = weight.shape().dims2()?;
    let (w_in, w_out) = match layout {
        WeightLayout::InOut => (a, b),
        WeightLayout::OutIn => (b, a),
    };
    if input != w_in || bias.dims() != [w_out] || input == 0 {
        candle_core::bail!(
            "affine: input {:?}, weight {:?} ({layout:?}), bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    Ok((x.shape().elem_count() / input, input, w_out))
}

/// (row stride, column stride) of the weight read as `[in, out]`.
fn weight_strides(layout: WeightLayout, input: usize, output: usize) -> (usize, usize) {
    match layout {
        WeightLayout::InOut => (output, 1),
        WeightLayout::OutIn => (1, input),
    }
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "affine"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, input, output) = dims_of(l1, l2, l3, self.layout)?;
        let x = contiguous::<f32>(s1, l1, "affine input")?;
        let weight = contiguous::<f32>(s2, l2, "affine weight")?;
        let bias = contiguous::<f32>(s3, l3, "affine bias")?;
        let mut out = Product {
            m: rows,
            n: output,
            k: input,
            lhs: x,
            lhs_strides: (input, 1),
            rhs: weight,
            rhs_strides: weight_strides(self.layout, input, output),
        }
        .run()?;
        // The bias after the product (not as its starting value): the `gemm` crate adds an
        // existing destination before or after the products depending on the operands'
        // layout, which would make the two weight layouts round differently.
        add_bias_in_place(&mut out, bias);
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = output;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_res = grad_res.contiguous()?;
        let (x_storage, l1) = x.storage_and_layout();
        let (w_storage, l2) = weight.storage_and_layout();
        let (g_storage, lg) = grad_res.storage_and_layout();
        let (Storage::Cpu(s1), Storage::Cpu(s2), Storage::Cpu(sg)) =
            (&*x_storage, &*w_storage, &*g_storage)
        else {
            candle_core::bail!("affine: backward on a non-CPU device");
        };
        let (rows, input, output) = dims_of(l1, l2, bias.layout(), self.layout)?;
        let x_values = contiguous::<f32>(s1, l1, "affine input")?;
        let w_values = contiguous::<f32>(s2, l2, "affine weight")?;
        let g = contiguous::<f32>(sg, lg, "affine gradient")?;
        // dx = dy · Wᵀ: element (o, i) of the `[out, in]` operand.
        let grad_x = Product {
            m: rows,
            n: input,
            k: output,
            lhs: g,
            lhs_strides: (output, 1),
            rhs: w_values,
            rhs_strides: match self.layout {
                WeightLayout::InOut => (1, output),
                WeightLayout::OutIn => (input, 1),
            },
        }
        .run()?;
        let grad_w = match self.layout {
            // dW = xᵀ · dy, `[in, out]`.
            WeightLayout::InOut => Product {
                m: input,
                n: output,
                k: rows,
                lhs: x_values,
                lhs_strides: (1, input),
                rhs: g,
                rhs_strides: (output, 1),
            },
            // dW = dyᵀ · x, `[out, in]`.
            WeightLayout::OutIn => Product {
                m: output,
                n: input,
                k: rows,
                lhs: g,
                lhs_strides: (1, output),
                rhs: x_values,
                rhs_strides: (input, 1),
            },
        }
        .run()?;
        let mut grad_b = vec![0f32; output];
        sum_rows_into(g, &mut grad_b);
        let device = candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(grad_x, l1.shape(), &device)?),
            Some(Tensor::from_vec(grad_w, l2.shape(), &device)?),
            Some(Tensor::from_vec(grad_b, output, &device)?),
        ))
    }
}

/// `x · W + bias` for `x` `[..., in]` (f32, CPU), the weight stored as `layout` says and
/// `bias` `[out]`: `[..., out]`, differentiable in all three.
pub fn affine(x: &Tensor, weight: &Tensor, bias: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        Affine { layout },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{assert_same_values_and_gradients, random_var};

    #[test]
    fn matches_composed_products_in_values_and_gradients() {
        for (shape, input, output) in [
            (vec![3, 7, 16], 16, 48),
            (vec![5, 8], 8, 3),
            (vec![2, 70, 64], 64, 256),
        ] {
            let x = random_var(&shape, 0.0, 1.0);
            let bias = random_var(&[output], 0.0, 1.0);
            let rows = shape.iter().product::<usize>() / input;
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = output;
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let weight = match layout {
                    WeightLayout::InOut => random_var(&[input, output], 0.0, 0.3),
                    WeightLayout::OutIn => random_var(&[output, input], 0.0, 0.3),
                };
                let fused =
                    affine(x.as_tensor(), weight.as_tensor(), bias.as_tensor(), layout).unwrap();
                let w = match layout {
                    WeightLayout::InOut => weight.as_tensor().clone(),
                    WeightLayout::OutIn => weight.as_tensor().t().unwrap(),
                };
                let composed = x
                    .as_tensor()
                    .reshape((rows, input))
                    .unwrap()
                    .matmul(&w)
                    .unwrap()
                    .broadcast_add(bias.as_tensor())
                    .unwrap()
                    .reshape(out_shape.clone())
                    .unwrap();
                assert_same_values_and_gradients(
                    fused,
                    composed,
                    &[&x, &weight, &bias],
                    1e-4,
                    1e-3,
                );
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 3), candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap();
        assert!(affine(&x, &w, &b, WeightLayout::InOut).is_err());
        let w = Tensor::zeros((4, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(affine(&x, &w, &b, WeightLayout::InOut).is_ok());
        assert!(affine(&x, &w, &b, WeightLayout::OutIn).is_err());
    }
}
