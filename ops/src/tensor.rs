//! A typed, contiguous, row-major tensor in device memory.

use std::marker::PhantomData;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::element::FloatElement;
use crate::error::OpError;

/// A device buffer with a shape and an element type. Contiguous and row-major.
pub struct Tensor<R: Runtime, E> {
    client: ComputeClient<R>,
    handle: Handle,
    shape: Vec<usize>,
    _elem: PhantomData<E>,
}

impl<R: Runtime, E> Clone for Tensor<R, E> {
    /// A second reference to the same device buffer (no copy).
    fn clone(&self) -> Self {
        Tensor {
            client: self.client.clone(),
            handle: self.handle.clone(),
            shape: self.shape.clone(),
            _elem: PhantomData,
        }
    }
}

impl<R: Runtime, E> std::fmt::Debug for Tensor<R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", std::any::type_name::<E>(), self.shape)
    }
}

impl<R: Runtime, E: CubeElement> Tensor<R, E> {
    /// Uploads `data` (row-major) as a tensor of `shape`.
    pub fn from_slice(
        client: &ComputeClient<R>,
        data: &[E],
        shape: &[usize],
    ) -> Result<Self, OpError> {
        Self::upload(client, E::as_bytes(data), data.len(), shape)
    }

    /// Reads the tensor back to the host (waits for pending work).
    pub fn to_vec(&self) -> Result<Vec<E>, OpError> {
        Ok(E::from_bytes(&self.read_bytes()?)[..self.len()].to_vec())
    }
}

impl<R: Runtime, E: FloatElement> Tensor<R, E> {
    /// Uploads f32 data converted to `E`.
    pub fn from_f32(
        client: &ComputeClient<R>,
        data: &[f32],
        shape: &[usize],
    ) -> Result<Self, OpError> {
        let converted: Vec<E> = data.iter().map(|&v| E::from_f64(v as f64)).collect();
        Self::from_slice(client, &converted, shape)
    }

    /// A tensor with every element set to `value`; tests fill outputs with NaN before a launch
    /// so that an element a kernel forgets to write cannot pass.
    pub fn full(client: &ComputeClient<R>, shape: &[usize], value: f64) -> Result<Self, OpError> {
        let n = check_buffer::<R, E>(client, "tensor", shape, "")?;
        let data = vec![E::from_f64(value); n];
        Self::from_slice(client, &data, shape)
    }

    /// Reads the tensor back converted to f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, OpError> {
        Ok(self
            .to_vec()?
            .into_iter()
            .map(|v| v.to_f64() as f32)
            .collect())
    }
}

impl<R: Runtime> Tensor<R, u32> {
    /// Uploads token ids (bytes, or 256 for the end id) as a u32 tensor of `shape`.
    pub fn from_ids(
        client: &ComputeClient<R>,
        ids: &[u32],
        shape: &[usize],
    ) -> Result<Self, OpError> {
        Self::from_slice(client, ids, shape)
    }

    /// Reads the ids back to the host.
    pub fn to_ids(&self) -> Result<Vec<u32>, OpError> {
        self.to_vec()
    }
}

impl<R: Runtime, E> Tensor<R, E> {
    /// A tensor of `shape` whose contents are unspecified until a kernel writes them. An
    /// error ([`OpError::BufferTooLarge`]) when the buffer is larger than the device's largest.
    pub fn empty(client: &ComputeClient<R>, shape: &[usize]) -> Result<Self, OpError> {
        Self::empty_named(client, shape, "tensor", "")
    }

    /// [`Tensor::empty`] for a buffer whose error, if it is too large, names it as `buffer`
    /// ("KV cache of the global stack") and says what to change (`hint`: "use fewer samples").
    pub fn empty_named(
        client: &ComputeClient<R>,
        shape: &[usize],
        buffer: &'static str,
        hint: &str,
    ) -> Result<Self, OpError> {
        let n = check_buffer::<R, E>(client, buffer, shape, hint)?;
        let handle = client.empty(n.max(1) * std::mem::size_of::<E>());
        Ok(Tensor {
            client: client.clone(),
            handle,
            shape: shape.to_vec(),
            _elem: PhantomData,
        })
    }

    /// Uploads `bytes`, `len` elements of E laid out row-major, as a tensor of `shape`.
    fn upload(
        client: &ComputeClient<R>,
        bytes: &[u8],
        len: usize,
        shape: &[usize],
    ) -> Result<Self, OpError> {
        let expected = check_buffer::<R, E>(client, "tensor", shape, "")?;
        if len != expected {
            return Err(OpError::DataLength {
                shape: shape.to_vec(),
                expected,
                got: len,
            });
        }
        Ok(Tensor {
            client: client.clone(),
            handle: client.create_from_slice(bytes),
            shape: shape.to_vec(),
            _elem: PhantomData,
        })
    }

    /// The buffer's bytes (waits for pending work).
    fn read_bytes(&self) -> Result<impl std::ops::Deref<Target = [u8]>, OpError> {
        self.client
            .read_one(self.handle.clone())
            .map_err(|e| OpError::Device(format!("{e:?}")))
    }
}

/// The element count of a buffer of `shape` of `E`, or an error naming `buffer` when its bytes
/// overflow or pass the device's largest buffer ([`crate::max_buffer_bytes`]). Allocations
/// past that limit fail on the device's own thread (a panic there, not an error here), so
/// every allocation is checked before it is made.
pub fn check_buffer<R: Runtime, E>(
    client: &ComputeClient<R>,
    buffer: &'static str,
    shape: &[usize],
    hint: &str,
) -> Result<usize, OpError> {
    let limit = crate::max_buffer_bytes(client);
    let bytes = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(std::mem::size_of::<E>()).map(|b| (n, b)));
    match bytes {
        Some((n, b)) if b <= limit => Ok(n),
        _ => Err(OpError::BufferTooLarge {
            buffer,
            shape: shape.to_vec(),
            bytes: bytes.map(|(_, b)| b),
            limit,
            hint: hint.to_string(),
        }),
    }
}

impl<R: Runtime, E> Tensor<R, E> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the tensor has exactly `expected` shape; the error names `op` and `name`.
    pub fn expect_shape(
        &self,
        op: &'static str,
        name: &'static str,
        expected: &[usize],
    ) -> Result<(), OpError> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(OpError::shape(op, name, &self.shape, expected.to_vec()))
        }
    }

    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The same buffer seen with another shape of the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self, OpError> {
        let n: usize = shape.iter().product();
        if n != self.len() {
            return Err(OpError::DataLength {
                shape: shape.to_vec(),
                expected: n,
                got: self.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self
        })
    }

    /// Row-major strides of the shape, in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.shape[i + 1];
        }
        strides
    }
}

/// A strided window onto a tensor's buffer: an element offset, a shape and element strides.
/// Lets an op read q, k and v straight out of one fused projection without copies.
#[derive(Debug)]
pub struct TensorView<'a, R: Runtime, E> {
    pub tensor: &'a Tensor<R, E>,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
}

impl<'a, R: Runtime, E> Clone for TensorView<'a, R, E> {
    fn clone(&self) -> Self {
        TensorView {
            tensor: self.tensor,
            offset: self.offset,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
        }
    }
}

impl<R: Runtime, E> Tensor<R, E> {
    /// The whole tensor as a contiguous view.
    pub fn view(&self) -> TensorView<'_, R, E> {
        TensorView {
            tensor: self,
            offset: 0,
            shape: self.shape.clone(),
            strides: self.strides(),
        }
    }

    /// A strided view; every element it can address must lie inside the buffer.
    pub fn strided(
        &self,
        offset: usize,
        shape: &[usize],
        strides: &[usize],
    ) -> Result<TensorView<'_, R, E>, OpError> {
        if shape.len() != strides.len() {
            return Err(OpError::Shape {
                op: "strided view",
                tensor: "strides",
                got: strides.to_vec(),
                expected: vec![0; shape.len()],
            });
        }
        let last = shape
            .iter()
            .zip(strides)
            .map(|(&n, &s)| n.saturating_sub(1) * s)
            .sum::<usize>()
            + offset;
        if shape.iter().all(|&n| n > 0) && last >= self.len() {
            return Err(OpError::ViewOutOfBounds {
                offset,
                shape: shape.to_vec(),
                strides: strides.to_vec(),
                len: self.len(),
            });
        }
        Ok(TensorView {
            tensor: self,
            offset,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        })
    }
}

impl<R: Runtime, E> Tensor<R, E> {
    /// The tensor as a flat array argument of `len()` elements.
    pub(crate) fn array(&self) -> ArrayArg<R> {
        // SAFETY: the buffer holds exactly `len()` elements of E.
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len()) }
    }

    /// The kernel argument for this tensor: its buffer, row-major strides and shape.
    pub(crate) fn arg(&self) -> TensorArg<R> {
        // SAFETY: the buffer holds exactly `len()` elements laid out row-major, which is what
        // these strides and shape describe.
        unsafe {
            TensorArg::from_raw_parts(
                self.handle.clone(),
                self.strides().into(),
                self.shape.clone().into(),
            )
        }
    }
}

impl<'a, R: Runtime, E> TensorView<'a, R, E> {
    /// The view's element offset as the u32 kernels take it; an error naming `op` past 2^32.
    pub fn offset_u32(&self, op: &'static str) -> Result<u32, OpError> {
        u32::try_from(self.offset).map_err(|_| OpError::Unsupported {
            op,
            what: "view offset",
            value: self.offset,
            reason: "must fit in 32 bits".into(),
        })
    }

    /// The view with its last two dims swapped: a transpose without a copy.
    pub fn t(&self) -> TensorView<'a, R, E> {
        let mut v = self.clone();
        let r = v.shape.len();
        if r >= 2 {
            v.shape.swap(r - 2, r - 1);
            v.strides.swap(r - 2, r - 1);
        }
        v
    }

    /// The kernel argument for this view (its offset travels separately).
    pub(crate) fn arg(&self) -> TensorArg<R> {
        // SAFETY: `Tensor::strided`/`Tensor::view` checked that every element the shape and
        // strides address lies inside the buffer.
        unsafe {
            TensorArg::from_raw_parts(
                self.tensor.handle().clone(),
                self.strides.clone().into(),
                self.shape.clone().into(),
            )
        }
    }
}
