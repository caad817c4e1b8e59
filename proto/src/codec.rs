//! The API's protobuf codec: prost's, except that a message that cannot be decoded is
//! INVALID_ARGUMENT rather than tonic's INTERNAL, so a client that sends bytes the schema does
//! not allow is told it is at fault, and INTERNAL keeps meaning a server bug.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// prost encoding and decoding with decode errors as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct ApiCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ApiCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for ApiCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ApiDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ApiDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decoder with its errors re-coded.
#[derive(Debug, Clone)]
pub struct ApiDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ApiDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!(
                "the message could not be decoded as protobuf: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
