//! The gRPC message framing: each message is a 1-byte flag (0 plain,
//! 1 compressed), a 4-byte big-endian length, and the message bytes.
//!
//! [`FrameObserver`] reads a stream's data chunks as they pass, without
//! holding them: it keeps only the 5 header bytes of the frame in progress
//! and a count of payload bytes still to come. Like a parse loop over a
//! buffer, a chunk that ends mid-frame is a normal outcome (the observer
//! waits for the next chunk); only the end of the stream in the middle of a
//! frame is an error.

use http::HeaderMap;

use super::status::Code;

/// Whether a stream's messages may be compressed: it names a
/// `grpc-encoding` other than `identity`.
pub(crate) fn compressed(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity")
}

/// Why a stream's framing is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A message larger than the configured maximum.
    TooLarge {
        /// The length the frame announced.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The flag byte was neither 0 nor 1.
    BadFlag(u8),
    /// A message marked compressed on a stream without `grpc-encoding`.
    CompressedWithoutEncoding,
    /// The stream ended inside a frame.
    Truncated {
        /// Bytes of the frame that arrived (header included).
        have: u64,
        /// Bytes the frame needed (header included).
        need: u64,
    },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => write!(
                f,
                "message of {len} bytes exceeds the limit of {max} bytes (listener.max_message_bytes)"
            ),
            FrameError::BadFlag(b) => write!(
                f,
                "malformed gRPC frame: compression flag {b} (must be 0 or 1)"
            ),
            FrameError::CompressedWithoutEncoding => write!(
                f,
                "malformed gRPC frame: compressed message without a grpc-encoding header"
            ),
            FrameError::Truncated { have, need } => write!(
                f,
                "truncated gRPC frame: the stream ended after {have} of {need} bytes"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

// === impl FrameError ===

impl FrameError {
    /// The status a call whose framing was refused ends with: a message
    /// over the limit is RESOURCE_EXHAUSTED (as gRPC libraries answer it),
    /// broken framing INTERNAL.
    pub(crate) fn code(&self) -> Code {
        match self {
            FrameError::TooLarge { .. } => Code::ResourceExhausted,
            FrameError::BadFlag(_)
            | FrameError::CompressedWithoutEncoding
            | FrameError::Truncated { .. } => Code::Internal,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Reading the 5-byte header; `have` bytes of it are in `buf`.
    Header { have: u8, buf: [u8; 5] },
    /// Skipping over a message's bytes.
    Payload { remaining: u32, len: u32 },
}

/// Follows the frames of one direction of one stream.
#[derive(Debug, Clone)]
pub(crate) struct FrameObserver {
    state: State,
    max: u32,
    compression_allowed: bool,
    messages: u64,
    bytes: u64,
}

// === impl FrameObserver ===

impl FrameObserver {
    /// An observer for messages of at most `max` bytes; `compression_allowed`
    /// when the stream declared a `grpc-encoding`.
    pub(crate) fn new(max: u32, compression_allowed: bool) -> Self {
        FrameObserver {
            state: State::Header {
                have: 0,
                buf: [0; 5],
            },
            max,
            compression_allowed,
            messages: 0,
            bytes: 0,
        }
    }

    /// Messages whose header was read so far.
    pub(crate) fn messages(&self) -> u64 {
        self.messages
    }

    /// Bytes seen so far (headers included).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads one data chunk.
    pub(crate) fn observe(&mut self, mut chunk: &[u8]) -> Result<(), FrameError> {
        self.bytes += chunk.len() as u64;
        while !chunk.is_empty() {
            match &mut self.state {
                State::Header { have, buf } => {
                    let take = (5 - *have as usize).min(chunk.len());
                    buf[*have as usize..*have as usize + take].copy_from_slice(&chunk[..take]);
                    *have += take as u8;
                    chunk = &chunk[take..];
                    if *have < 5 {
                        continue;
                    }
                    let flag = buf[0];
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
                    match flag {
                        0 => {}
                        1 if self.compression_allowed => {}
                        1 => return Err(FrameError::CompressedWithoutEncoding),
                        other => return Err(FrameError::BadFlag(other)),
                    }
                    if len > self.max {
                        return Err(FrameError::TooLarge { len, max: self.max });
                    }
                    self.messages += 1;
                    self.state = if len == 0 {
                        State::Header {
                            have: 0,
                            buf: [0; 5],
                        }
                    } else {
                        State::Payload {
                            remaining: len,
                            len,
                        }
                    };
                }
                State::Payload { remaining, .. } => {
                    let take = (*remaining as usize).min(chunk.len());
                    *remaining -= take as u32;
                    chunk = &chunk[take..];
                    if *remaining == 0 {
                        self.state = State::Header {
                            have: 0,
                            buf: [0; 5],
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that the stream did not end inside a frame.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        match self.state {
            State::Header { have: 0, .. } => Ok(()),
            State::Header { have, .. } => Err(FrameError::Truncated {
                have: u64::from(have),
                need: 5,
            }),
            State::Payload { remaining, len } => Err(FrameError::Truncated {
                have: 5 + u64::from(len - remaining),
                need: 5 + u64::from(len),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn counts_messages_across_any_chunking() {
        let mut stream = frame(0, b"hello");
        stream.extend(frame(0, b""));
        stream.extend(frame(0, &[7; 300]));
        for chunk_size in [1, 2, 3, 5, 7, 64, 1000] {
            let mut o = FrameObserver::new(1024, false);
            for c in stream.chunks(chunk_size) {
                o.observe(c).unwrap();
            }
            o.finish().unwrap();
            assert_eq!(o.messages(), 3, "chunk size {chunk_size}");
            assert_eq!(o.bytes(), stream.len() as u64);
        }
    }

    #[test]
    fn refuses_oversized_messages_at_the_header() {
        let mut o = FrameObserver::new(10, false);
        let err = o.observe(&frame(0, &[0; 11])[..5]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: 11, max: 10 });
        assert!(err.to_string().contains("listener.max_message_bytes"));
        let mut o = FrameObserver::new(10, false);
        o.observe(&frame(0, &[0; 10])).unwrap();
    }

    #[test]
    fn refuses_bad_flags_and_unannounced_compression() {
        let mut o = FrameObserver::new(100, false);
        assert_eq!(o.observe(&frame(2, b"x")), Err(FrameError::BadFlag(2)));
        let mut o = FrameObserver::new(100, false);
        assert_eq!(
            o.observe(&frame(1, b"x")),
            Err(FrameError::CompressedWithoutEncoding)
        );
        let mut o = FrameObserver::new(100, true);
        o.observe(&frame(1, b"x")).unwrap();
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated() {
        let f = frame(0, b"abcdef");
        let mut o = FrameObserver::new(100, false);
        o.observe(&f[..3]).unwrap();
        assert_eq!(o.finish(), Err(FrameError::Truncated { have: 3, need: 5 }));
        let mut o = FrameObserver::new(100, false);
        o.observe(&f[..8]).unwrap();
        assert_eq!(o.finish(), Err(FrameError::Truncated { have: 8, need: 11 }));
    }
}
