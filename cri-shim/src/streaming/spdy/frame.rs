//! SPDY/3.1 framing, the part a kubelet's streams use: SYN_STREAM / SYN_REPLY with zlib
//! header blocks (one compression context per direction for the whole connection, seeded
//! with the SPDY dictionary), DATA with FIN, RST_STREAM, PING, GOAWAY; SETTINGS, HEADERS and
//! WINDOW_UPDATE are read and ignored (the Go peers do no flow control either).

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::dictionary::DICTIONARY;

const VERSION: u16 = 3;
const FLAG_FIN: u8 = 0x01;
/// Largest frame accepted (the 24-bit length allows 16 MiB).
const MAX_FRAME: usize = 1 << 24;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;

/// Header name/value pairs (names lower-case).
pub type Headers = Vec<(String, String)>;

/// A frame this server acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The peer opens a stream.
    SynStream {
        /// Its ID.
        stream_id: u32,
        /// Whether the peer sends nothing on it.
        fin: bool,
        /// Its headers.
        headers: Headers,
    },
    /// The answer to a SYN_STREAM.
    SynReply {
        /// The stream.
        stream_id: u32,
        /// Whether this side sends nothing on it.
        fin: bool,
    },
    /// Data on a stream; `fin` ends the sender's half.
    Data {
        /// The stream.
        stream_id: u32,
        /// Last frame of the sender's half.
        fin: bool,
        /// The payload.
        data: Bytes,
    },
    /// The stream is aborted.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// The status code.
        status: u32,
    },
    /// A liveness probe, echoed.
    Ping(u32),
    /// The session ends.
    GoAway {
        /// The last stream the sender handled.
        last_stream_id: u32,
    },
    /// A frame read and ignored.
    Ignored,
}

/// Why the connection's frames could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    /// Not SPDY/3 or malformed.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The header block did not inflate.
    #[error("header block: {0}")]
    Inflate(String),
}

/// Reads frames, inflating header blocks with the connection's decompressor.
pub struct FrameReader<R> {
    io: R,
    inflate: Decompress,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader of `io` with a fresh decompression context.
    pub fn new(io: R) -> Self {
        Self {
            io,
            inflate: Decompress::new(true),
        }
    }

    /// The next frame.
    pub async fn next(&mut self) -> Result<Frame, FrameError> {
        let mut head = [0u8; 8];
        self.io.read_exact(&mut head).await?;
        let flags = head[4];
        let len = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
        if len > MAX_FRAME {
            return Err(FrameError::Protocol("frame too large"));
        }
        let mut body = vec![0u8; len];
        self.io.read_exact(&mut body).await?;
        let word = |i: usize| {
            body.get(i..i + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                .ok_or(FrameError::Protocol("short control frame"))
        };
        if head[0] & 0x80 == 0 {
            return Ok(Frame::Data {
                stream_id: u32::from_be_bytes([head[0], head[1], head[2], head[3]]),
                fin: flags & FLAG_FIN != 0,
                data: body.into(),
            });
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        if version != VERSION {
            return Err(FrameError::Protocol("not SPDY/3"));
        }
        Ok(match u16::from_be_bytes([head[2], head[3]]) {
            SYN_STREAM => {
                let block = body
                    .get(10..)
                    .ok_or(FrameError::Protocol("short SYN_STREAM"))?;
                let headers = self.inflate_headers(block)?;
                Frame::SynStream {
                    stream_id: word(0)?,
                    fin: flags & FLAG_FIN != 0,
                    headers,
                }
            }
            RST_STREAM => Frame::RstStream {
                stream_id: word(0)?,
                status: word(4)?,
            },
            PING => Frame::Ping(word(0)?),
            GOAWAY => Frame::GoAway {
                last_stream_id: word(0)?,
            },
            SYN_REPLY | 8 => {
                // SYN_REPLY (we open no streams) or HEADERS: keep the inflate context in step.
                if let Some(block) = body.get(4..) {
                    self.inflate_headers(block)?;
                }
                Frame::Ignored
            }
            _ => Frame::Ignored,
        })
    }

    fn inflate_headers(&mut self, block: &[u8]) -> Result<Headers, FrameError> {
        let raw = inflate(&mut self.inflate, block)?;
        parse_headers(&raw).ok_or(FrameError::Protocol("malformed header block"))
    }
}

/// Inflates one header block (sync-flushed by the peer), supplying the dictionary when zlib
/// asks for it.
fn inflate(d: &mut Decompress, mut input: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    while !input.is_empty() {
        let before = d.total_in();
        let result = d.decompress_vec(input, &mut out, FlushDecompress::Sync);
        input = &input[usize::try_from(d.total_in() - before).unwrap_or(input.len())..];
        match result {
            Ok(Status::StreamEnd) => break,
            Ok(_) => {
                if out.len() == out.capacity() {
                    out.reserve(out.capacity());
                } else if d.total_in() == before {
                    return Err(FrameError::Inflate("no progress".into()));
                }
            }
            Err(e) if e.needs_dictionary().is_some() => {
                d.set_dictionary(&DICTIONARY)
                    .map_err(|e| FrameError::Inflate(e.to_string()))?;
            }
            Err(e) => return Err(FrameError::Inflate(e.to_string())),
        }
    }
    Ok(out)
}

/// Parses `count, (len, name, len, value)*` (all lengths 32-bit big-endian).
fn parse_headers(raw: &[u8]) -> Option<Headers> {
    let mut rest = raw;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let word = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let count = word(take(4)?);
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let len = word(take(4)?);
        let name = String::from_utf8_lossy(take(len)?).to_ascii_lowercase();
        let len = word(take(4)?);
        let value = String::from_utf8_lossy(take(len)?).into_owned();
        for v in value.split('\0') {
            headers.push((name.clone(), v.to_string()));
        }
    }
    Some(headers)
}

/// Encodes frames, deflating header blocks with the connection's compressor.
pub struct FrameWriter {
    deflate: Compress,
}

impl Default for FrameWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameWriter {
    /// A writer with a fresh compression context seeded with the dictionary.
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        // Only fails before any input, for a dictionary zlib refuses: never for this one.
        let _ = deflate.set_dictionary(&DICTIONARY);
        Self { deflate }
    }

    /// The bytes of `frame`.
    pub fn encode(&mut self, frame: &Frame) -> Vec<u8> {
        let control = |kind: u16, flags: u8, body: &[u8]| {
            let mut out = Vec::with_capacity(8 + body.len());
            out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.push(flags);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            out.extend_from_slice(body);
            out
        };
        let fin = |f: bool| if f { FLAG_FIN } else { 0 };
        match frame {
            Frame::SynReply { stream_id, fin: f } => {
                let mut body = stream_id.to_be_bytes().to_vec();
                body.extend(self.deflate_headers(&[]));
                control(SYN_REPLY, fin(*f), &body)
            }
            Frame::SynStream {
                stream_id,
                fin: f,
                headers,
            } => {
                let mut body = stream_id.to_be_bytes().to_vec();
                body.extend_from_slice(&[0; 6]);
                body.extend(self.deflate_headers(headers));
                control(SYN_STREAM, fin(*f), &body)
            }
            Frame::Data {
                stream_id,
                fin: f,
                data,
            } => {
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                out.push(fin(*f));
                out.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
                out.extend_from_slice(data);
                out
            }
            Frame::RstStream { stream_id, status } => {
                let body = [stream_id.to_be_bytes(), status.to_be_bytes()].concat();
                control(RST_STREAM, 0, &body)
            }
            Frame::Ping(id) => control(PING, 0, &id.to_be_bytes()),
            Frame::GoAway { last_stream_id } => {
                let body = [last_stream_id.to_be_bytes(), 0u32.to_be_bytes()].concat();
                control(GOAWAY, 0, &body)
            }
            Frame::Ignored => Vec::new(),
        }
    }

    fn deflate_headers(&mut self, headers: &[(String, String)]) -> Vec<u8> {
        let mut raw = (headers.len() as u32).to_be_bytes().to_vec();
        for (name, value) in headers {
            for s in [name, value] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            let before = self.deflate.total_in();
            if self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            input =
                &input[usize::try_from(self.deflate.total_in() - before).unwrap_or(input.len())..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_spdy3_one() {
        // Size and Adler-32 as every SPDY/3 implementation has them.
        assert_eq!(DICTIONARY.len(), 1423);
        let mut a: u32 = 1;
        let mut b: u32 = 0;
        for byte in DICTIONARY.iter() {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(b << 16 | a, 0xe3c6_a7c2);
    }

    #[tokio::test]
    async fn frames_round_trip_through_one_compression_context_per_direction() {
        let mut writer = FrameWriter::new();
        let frames = [
            Frame::SynStream {
                stream_id: 1,
                fin: false,
                headers: vec![("streamtype".into(), "error".into())],
            },
            Frame::SynStream {
                stream_id: 3,
                fin: true,
                headers: vec![
                    ("streamtype".into(), "stdout".into()),
                    ("port".into(), "80".into()),
                ],
            },
            Frame::Data {
                stream_id: 3,
                fin: true,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Ping(7),
            Frame::RstStream {
                stream_id: 1,
                status: 5,
            },
            Frame::GoAway { last_stream_id: 3 },
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| writer.encode(f)).collect();
        let mut reader = FrameReader::new(&wire[..]);
        for frame in &frames {
            assert_eq!(&reader.next().await.unwrap(), frame);
        }
        assert!(matches!(reader.next().await, Err(FrameError::Io(_))));
    }

    #[test]
    fn header_blocks_split_nul_separated_values() {
        let raw = [
            &1u32.to_be_bytes()[..],
            &4u32.to_be_bytes(),
            b"Port",
            &5u32.to_be_bytes(),
            b"80\x0081",
        ]
        .concat();
        assert_eq!(
            parse_headers(&raw),
            Some(vec![
                ("port".to_string(), "80".to_string()),
                ("port".to_string(), "81".to_string())
            ])
        );
        assert_eq!(parse_headers(&raw[..6]), None);
    }
}
