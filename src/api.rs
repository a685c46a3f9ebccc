//! The generated gRPC types and stubs (`proto/byokd/v1/vault.proto`), and the descriptor set
//! that server reflection serves.
//!
//! Messages that carry a secret value or a lease token are generated without `Debug`; the
//! impls below print their lengths instead of their contents.

use std::fmt;

/// Package `byokd.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("byokd.v1");
}

/// Package `byokd.bench.v1`: byokd-bench's no-op baseline service (not served by byokd).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod bench {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("byokd.bench.v1");
    }
}

/// The protobuf codec of the generated services: prost's, except that a request message
/// that does not decode is `INVALID_ARGUMENT` (the caller's mistake), not `INTERNAL`.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic::codec::Codec::encoder(&mut self.0)
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(tonic::codec::Codec::decoder(&mut self.0))
    }
}

/// [`Codec`]'s decoder.
#[derive(Debug)]
pub struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        self.0
            .decode(buf)
            .map_err(|_| tonic::Status::invalid_argument("malformed request message"))
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// Encoded `FileDescriptorSet` of `byokd.v1` and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/byokd_descriptor.bin"));

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}

impl fmt::Debug for v1::StoreRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreRequest")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("value", &Redacted(self.value.len()))
            .field("labels", &self.labels)
            .finish()
    }
}

impl fmt::Debug for v1::RotateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateRequest")
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("value", &Redacted(self.value.len()))
            .finish()
    }
}

impl fmt::Debug for v1::GetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetRequest")
            .field("token", &Redacted(self.token.len()))
            .finish()
    }
}

impl fmt::Debug for v1::SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretValue")
            .field("value", &Redacted(self.value.len()))
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("version", &self.version)
            .field("lease_id", &self.lease_id)
            .field("remaining_uses", &self.remaining_uses)
            .finish()
    }
}

impl fmt::Debug for v1::LeaseGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseGrant")
            .field("lease_id", &self.lease_id)
            .field("token", &Redacted(self.token.len()))
            .field("expires_at", &self.expires_at)
            .field("max_uses", &self.max_uses)
            .field("version", &self.version)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn debug_never_prints_values_or_tokens() {
        let store = v1::StoreRequest {
            tenant: "t".into(),
            value: b"sk-live-SECRET".to_vec(),
            ..Default::default()
        };
        let get = v1::GetRequest {
            token: "byokd_lt_SECRET".into(),
        };
        let value = v1::SecretValue {
            value: b"sk-live-SECRET".to_vec(),
            ..Default::default()
        };
        let grant = v1::LeaseGrant {
            token: "byokd_lt_SECRET".into(),
            ..Default::default()
        };
        let rotate = v1::RotateRequest {
            value: b"sk-live-SECRET".to_vec(),
            ..Default::default()
        };
        for text in [
            format!("{store:?}"),
            format!("{get:?}"),
            format!("{value:?}"),
            format!("{grant:?}"),
            format!("{rotate:?}"),
        ] {
            assert!(!text.contains("SECRET"), "{text}");
            assert!(text.contains("<redacted"), "{text}");
        }
    }
}
