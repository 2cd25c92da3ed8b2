//! One TopK autoencoder's parameters, by name, in whichever form a stage holds them.

/// The four parameters of one autoencoder, generic over their representation: host buffers
/// (`Vec<f32>`, row-major), candle tensors, or trainable `Var`s. Shapes: `w_enc (F, D)`,
/// `b_enc (F)`, `w_dec (D, F)`, `b_dec (D)` — the reference's `encoder.weight`,
/// `encoder.bias`, `decoder.weight` and `b_dec`.
///
/// [`each`](Self::each) visits the fields in *layout order* (w_enc, b_enc, w_dec, b_dec): every
/// sum over a module's parameters (e.g. the clipping norm) runs in that order, so results do
/// not depend on the representation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AeParams<T> {
    pub w_enc: T,
    pub b_enc: T,
    pub w_dec: T,
    pub b_dec: T,
}

impl<T> AeParams<T> {
    /// The fields in layout order.
    pub fn each(&self) -> [&T; 4] {
        [&self.w_enc, &self.b_enc, &self.w_dec, &self.b_dec]
    }

    /// The fields in layout order, mutably.
    pub fn each_mut(&mut self) -> [&mut T; 4] {
        [&mut self.w_enc, &mut self.b_enc, &mut self.w_dec, &mut self.b_dec]
    }

    /// The fields with their state-dict suffixes, in PyTorch's `ae.parameters()` order
    /// (`b_dec`, `encoder.weight`, `encoder.bias`, `decoder.weight`).
    pub fn named(&self) -> [(&'static str, &T); 4] {
        [
            ("b_dec", &self.b_dec),
            ("encoder.weight", &self.w_enc),
            ("encoder.bias", &self.b_enc),
            ("decoder.weight", &self.w_dec),
        ]
    }

    /// The fields with their state-dict suffixes (order of [`named`](Self::named)), mutably.
    pub fn named_mut(&mut self) -> [(&'static str, &mut T); 4] {
        [
            ("b_dec", &mut self.b_dec),
            ("encoder.weight", &mut self.w_enc),
            ("encoder.bias", &mut self.b_enc),
            ("decoder.weight", &mut self.w_dec),
        ]
    }

    /// Apply `f` to every field.
    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> AeParams<U> {
        AeParams { w_enc: f(&self.w_enc), b_enc: f(&self.b_enc), w_dec: f(&self.w_dec), b_dec: f(&self.b_dec) }
    }

    /// Apply a fallible `f` to every field (in layout order), stopping at the first error.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<AeParams<U>, E> {
        Ok(AeParams { w_enc: f(&self.w_enc)?, b_enc: f(&self.b_enc)?, w_dec: f(&self.w_dec)?, b_dec: f(&self.b_dec)? })
    }

    /// Combine with `other` field by field (in layout order).
    pub fn try_zip<U, V, E>(
        &self,
        other: &AeParams<U>,
        mut f: impl FnMut(&T, &U) -> Result<V, E>,
    ) -> Result<AeParams<V>, E> {
        Ok(AeParams {
            w_enc: f(&self.w_enc, &other.w_enc)?,
            b_enc: f(&self.b_enc, &other.b_enc)?,
            w_dec: f(&self.w_dec, &other.w_dec)?,
            b_dec: f(&self.b_dec, &other.b_dec)?,
        })
    }
}

impl AeParams<Vec<usize>> {
    /// The parameter shapes of an autoencoder of `f` features on `d` dimensions.
    pub fn shapes(d: usize, f: usize) -> AeParams<Vec<usize>> {
        AeParams { w_enc: vec![f, d], b_enc: vec![f], w_dec: vec![d, f], b_dec: vec![d] }
    }
}

impl AeParams<Vec<f32>> {
    /// Zeros shaped like `self`.
    pub fn zeros_like(&self) -> AeParams<Vec<f32>> {
        self.map(|v| vec![0f32; v.len()])
    }

    /// Hold the decoder decoder-major, `(F, D)` (each feature's direction contiguous), as
    /// `train-suite`'s host loop does between checkpoints; [`Self::decoder_to_standard`]
    /// undoes it exactly.
    pub fn decoder_to_major(&mut self, d: usize, f: usize) {
        self.w_dec = crate::util::blas::transpose(&self.w_dec, d, f);
    }

    /// Back to the standard `(D, F)` decoder from [`Self::decoder_to_major`].
    pub fn decoder_to_standard(&mut self, d: usize, f: usize) {
        self.w_dec = crate::util::blas::transpose(&self.w_dec, f, d);
    }

    /// Hold the encoder input-major, `(D, F)` (its transpose), as `train-suite`'s host loop does
    /// between checkpoints: the encoder product reads it row-major, which its kernel packs
    /// faster than the transposed view (same bits). [`Self::encoder_to_standard`] undoes it.
    pub fn encoder_to_major(&mut self, d: usize, f: usize) {
        self.w_enc = crate::util::blas::transpose(&self.w_enc, f, d);
    }

    /// Back to the standard `(F, D)` encoder from [`Self::encoder_to_major`].
    pub fn encoder_to_standard(&mut self, d: usize, f: usize) {
        self.w_enc = crate::util::blas::transpose(&self.w_enc, d, f);
    }

    /// [`Self::encoder_to_major`] and [`Self::decoder_to_major`]: the host pretraining layout.
    pub fn to_host_layout(&mut self, d: usize, f: usize) {
        self.encoder_to_major(d, f);
        self.decoder_to_major(d, f);
    }

    /// Back from [`Self::to_host_layout`].
    pub fn to_standard_layout(&mut self, d: usize, f: usize) {
        self.encoder_to_standard(d, f);
        self.decoder_to_standard(d, f);
    }
}

impl AeParams<candle_core::Var> {
    /// The gradients of these variables in `store` (zeros for a variable the loss does not
    /// reach).
    pub fn grads(
        &self,
        store: &candle_core::backprop::GradStore,
    ) -> crate::error::Result<AeParams<candle_core::Tensor>> {
        self.try_map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => Ok(v.as_tensor().zeros_like()?),
        })
    }

    /// The current values as host buffers.
    pub fn to_host(&self) -> crate::error::Result<AeParams<Vec<f32>>> {
        self.try_map(|v| crate::util::to_vec(v.as_tensor()))
    }

    /// Overwrite the variables with host values (shapes and devices kept).
    pub fn set_host(&self, values: &AeParams<Vec<f32>>) -> crate::error::Result<()> {
        for (var, vals) in self.each().into_iter().zip(values.each()) {
            let t = candle_core::Tensor::from_slice(vals, var.as_tensor().shape(), var.as_tensor().device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Variables on `device` holding host values, shaped for `d` dimensions and `f` features.
    pub fn from_host(
        p: &AeParams<Vec<f32>>,
        d: usize,
        f: usize,
        device: &candle_core::Device,
    ) -> crate::error::Result<Self> {
        p.try_zip(&AeParams::shapes(d, f), |v, shape| {
            Ok(candle_core::Var::from_tensor(&candle_core::Tensor::from_slice(v, shape.as_slice(), device)?)?)
        })
    }
}
