//! tonic codecs that carry an export request as raw bytes, so the receiver hands the wire
//! bytes to the scanner and the exporter sends re-framed bytes without a prost round trip.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Decodes messages of type `D` as the raw bytes of one gRPC message; encodes `E` with prost.
/// The receiver uses `RawCodec<Response, Bytes>`; the exporter `RawCodec<Bytes, Response>`.
pub struct RawCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for RawCodec<E, D> {
    fn default() -> Self {
        RawCodec(PhantomData)
    }
}

/// Writes or reads one message body.
pub trait Body: Send + 'static + Sized {
    fn write(self, dst: &mut EncodeBuf<'_>) -> Result<(), Status>;
    fn read(src: &mut DecodeBuf<'_>) -> Result<Self, Status>;
}

impl Body for Bytes {
    fn write(self, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(self);
        Ok(())
    }

    fn read(src: &mut DecodeBuf<'_>) -> Result<Self, Status> {
        // One copy into an exactly sized buffer: the spans held for a decision are slices
        // of it, and the decoder's own buffer (grown by doubling) would otherwise stay
        // allocated, spare capacity and all, until the last of them is exported.
        let mut exact = bytes::BytesMut::with_capacity(src.remaining());
        exact.put(src);
        Ok(exact.freeze())
    }
}

/// Any prost message is a body, encoded and decoded with prost.
#[derive(Debug)]
pub struct Prost<M>(pub M);

impl<M: prost::Message + Default + Send + 'static> Body for Prost<M> {
    fn write(self, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0
            .encode(dst)
            .map_err(|e| Status::internal(format!("encoding a response: {e}")))
    }

    fn read(src: &mut DecodeBuf<'_>) -> Result<Self, Status> {
        M::decode(src)
            .map(Prost)
            .map_err(|e| Status::internal(format!("decoding a response: {e}")))
    }
}

pub struct BodyEncoder<E>(PhantomData<fn(E)>);
pub struct BodyDecoder<D>(PhantomData<fn() -> D>);

impl<E: Body> Encoder for BodyEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write(dst)
    }
}

impl<D: Body> Decoder for BodyDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::read(src).map(Some)
    }
}

impl<E: Body, D: Body> Codec for RawCodec<E, D> {
    type Encode = E;
    type Decode = D;
    type Encoder = BodyEncoder<E>;
    type Decoder = BodyDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        BodyEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        BodyDecoder(PhantomData)
    }
}
