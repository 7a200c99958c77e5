//! Holding a call until its first request message has arrived, for limits
//! that read request fields. The frames read are kept as they came and
//! forwarded first, so the upstream gets the request unchanged; only the
//! first message's bytes are looked at (decompressed, when the config lets
//! a gzip message be, into a copy bounded like the message).

use std::collections::VecDeque;
use std::io::Read as _;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::limit::FirstMessage;

/// What was read of a request before its limits were decided.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// The frames read, in order, to forward before the rest.
    pub(crate) frames: VecDeque<Frame<Bytes>>,
    /// The first message, if it can be read.
    message: Option<Bytes>,
}

/// Why a call could not be held to its first message.
#[derive(Debug)]
pub(crate) enum HoldError {
    /// The first message is larger than `limiter.inspect.max_bytes`
    /// (`decompressed`: once gunzipped).
    TooLarge {
        /// The bound.
        max: usize,
        /// Whether it was the decompressed size.
        decompressed: bool,
    },
    /// No whole first message before the deadline.
    TimedOut,
    /// The client reset the stream (or its connection failed).
    Client,
}

/// How a request's compressed messages may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// `grpc-encoding: gzip`, and the config lets tollgate decompress it.
    Gzip,
    /// Any other: a compressed message cannot be read.
    Opaque,
}

// === impl Held ===

impl Held {
    /// The first message as limits see it.
    pub(crate) fn message(&self) -> FirstMessage<'_> {
        match &self.message {
            Some(m) => FirstMessage::Held(m),
            None => FirstMessage::Unreadable,
        }
    }
}

/// Reads `body` until its first whole message (or its end), by `until`.
pub(crate) async fn first_message(
    body: &mut Incoming,
    max: usize,
    encoding: Encoding,
    until: Option<Instant>,
) -> Result<Held, HoldError> {
    let mut held = Held::default();
    // The bytes of the first frame so far, copied only when it spans
    // several DATA frames.
    let mut head = BytesMut::new();
    loop {
        let next = body.frame();
        let frame = match until {
            Some(t) => tokio::time::timeout_at(t, next)
                .await
                .map_err(|_| HoldError::TimedOut)?,
            None => next.await,
        };
        let frame = match frame {
            None => return Ok(held),
            Some(Err(_)) => return Err(HoldError::Client),
            Some(Ok(f)) => f,
        };
        let Some(data) = frame.data_ref() else {
            held.frames.push_back(frame);
            continue;
        };
        let data = data.clone();
        held.frames.push_back(frame);
        // Most often the whole message is in its first DATA frame: read in
        // place; else copied together (at most `max` and a frame).
        let (buf, len) = if head.is_empty() {
            match announced(&data, max)? {
                Some(len) if data.len() >= 5 + len => (data, len),
                _ => {
                    head.extend_from_slice(&data);
                    continue;
                }
            }
        } else {
            head.extend_from_slice(&data);
            match announced(&head, max)? {
                Some(len) if head.len() >= 5 + len => (std::mem::take(&mut head).freeze(), len),
                _ => continue,
            }
        };
        held.message = readable(buf[0], buf.slice(5..5 + len), encoding, max)?;
        return Ok(held);
    }
}

/// The first message's length, once its 5-byte prefix is there; refused
/// above `max` at once.
fn announced(b: &[u8], max: usize) -> Result<Option<usize>, HoldError> {
    if b.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if len > max {
        return Err(HoldError::TooLarge {
            max,
            decompressed: false,
        });
    }
    Ok(Some(len))
}

/// The message's bytes to read fields from: as sent, gunzipped when
/// allowed, or none (compressed otherwise, or a flag the frame observer
/// refuses when the call is forwarded).
fn readable(
    flag: u8,
    payload: Bytes,
    encoding: Encoding,
    max: usize,
) -> Result<Option<Bytes>, HoldError> {
    match (flag, encoding) {
        (0, _) => Ok(Some(payload)),
        (1, Encoding::Gzip) => {
            let mut out = Vec::new();
            // Every member, as gzip readers in gRPC libraries read them: a
            // second member must not carry fields the limit never saw.
            let mut d = flate2::read::MultiGzDecoder::new(&payload[..]).take(max as u64 + 1);
            if d.read_to_end(&mut out).is_err() {
                // Not gzip after all: the upstream says so; its fields are
                // missing here.
                return Ok(None);
            }
            if out.len() > max {
                return Err(HoldError::TooLarge {
                    max,
                    decompressed: true,
                });
            }
            Ok(Some(out.into()))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn framed(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flag];
        f.extend((payload.len() as u32).to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn a_length_is_known_from_the_prefix_and_refused_over_the_bound() {
        let f = framed(0, b"hello");
        for cut in 0..5 {
            assert!(announced(&f[..cut], 100).unwrap().is_none(), "{cut}");
        }
        assert_eq!(announced(&f[..5], 100).unwrap(), Some(5));
        // The length alone says it is too large: no need to wait for it.
        assert!(matches!(
            announced(&framed(0, &[0; 101])[..5], 100),
            Err(HoldError::TooLarge {
                max: 100,
                decompressed: false
            })
        ));
    }

    #[test]
    fn gzip_is_read_only_when_allowed_and_within_the_bound() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&[7; 1000]).unwrap();
        let gz: Bytes = gz.finish().unwrap().into();
        assert_eq!(
            readable(1, gz.clone(), Encoding::Gzip, 1000)
                .unwrap()
                .unwrap()
                .len(),
            1000
        );
        assert_eq!(
            readable(1, gz.clone(), Encoding::Opaque, 1000).unwrap(),
            None
        );
        // A small message that inflates past the bound.
        assert!(matches!(
            readable(1, gz, Encoding::Gzip, 999),
            Err(HoldError::TooLarge {
                decompressed: true,
                ..
            })
        ));
        assert_eq!(
            readable(1, Bytes::from_static(b"not gzip"), Encoding::Gzip, 99).unwrap(),
            None
        );
        // Two gzip members: both are read, as gRPC libraries read them.
        let member = |b: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(b).unwrap();
            gz.finish().unwrap()
        };
        let mut two = member(b"first ");
        two.extend(member(b"second"));
        assert_eq!(
            readable(1, two.into(), Encoding::Gzip, 99)
                .unwrap()
                .unwrap(),
            "first second"
        );
        assert_eq!(
            readable(0, Bytes::from_static(b"x"), Encoding::Opaque, 99)
                .unwrap()
                .unwrap(),
            "x"
        );
    }
}
