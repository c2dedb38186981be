//! The `channel.k8s.io` WebSocket subprotocols: each message starts with its channel number
//! (binary), or with the number as an ASCII digit followed by base64 (the `base64.` variants).
//! v4 writes a JSON `metav1.Status` on the error channel; v5 adds the CLOSE message
//! (`255, channel`) with which a client ends its stdin.

use base64::Engine;
use bytes::Bytes;

/// Remote command channels.
pub mod ids {
    /// Standard input (client to server).
    pub const STDIN: u8 = 0;
    /// Standard output.
    pub const STDOUT: u8 = 1;
    /// Standard error.
    pub const STDERR: u8 = 2;
    /// The final status.
    pub const ERROR: u8 = 3;
    /// Terminal resize events (client to server).
    pub const RESIZE: u8 = 4;
    /// v5: the client closed the channel named by the payload.
    pub const CLOSE: u8 = 255;
}

/// How channel numbers and payloads are encoded in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Binary messages: channel byte, then the raw payload.
    Binary,
    /// Text messages: channel digit, then the payload in base64.
    Base64,
}

/// One subprotocol this server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// The `Sec-WebSocket-Protocol` token (empty: the client named none).
    pub name: &'static str,
    /// The message encoding.
    pub codec: Codec,
    /// 1 (pre-v4: plain error text), 4 (JSON status) or 5 (JSON status and CLOSE).
    pub version: u8,
}

const fn protocol(name: &'static str, codec: Codec, version: u8) -> Protocol {
    Protocol {
        name,
        codec,
        version,
    }
}

/// What Exec and Attach accept, best first.
pub const REMOTE_COMMAND: &[Protocol] = &[
    protocol("v5.channel.k8s.io", Codec::Binary, 5),
    protocol("v4.channel.k8s.io", Codec::Binary, 4),
    protocol("v4.base64.channel.k8s.io", Codec::Base64, 4),
    protocol("channel.k8s.io", Codec::Binary, 1),
    protocol("base64.channel.k8s.io", Codec::Base64, 1),
    protocol("", Codec::Binary, 1),
];

/// What PortForward accepts.
pub const PORT_FORWARD: &[Protocol] = &[
    protocol("v4.channel.k8s.io", Codec::Binary, 4),
    protocol("v4.base64.channel.k8s.io", Codec::Base64, 4),
    protocol("", Codec::Binary, 1),
];

/// The first of the client's requested subprotocols (in its order) that `supported` has; a
/// client that names none gets the unnamed binary protocol, if supported.
pub fn negotiate(requested: &[&str], supported: &[Protocol]) -> Option<Protocol> {
    let requested = if requested.is_empty() {
        &[""][..]
    } else {
        requested
    };
    requested
        .iter()
        .find_map(|r| supported.iter().find(|p| p.name == r.trim()).copied())
}

/// A WebSocket message: binary or text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A binary message.
    Binary(Bytes),
    /// A text message.
    Text(String),
}

impl Codec {
    /// The message carrying `data` on `channel`.
    pub fn encode(self, channel: u8, data: &[u8]) -> Frame {
        match self {
            Codec::Binary => {
                let mut msg = Vec::with_capacity(data.len() + 1);
                msg.push(channel);
                msg.extend_from_slice(data);
                Frame::Binary(msg.into())
            }
            Codec::Base64 => {
                let mut msg = String::with_capacity(data.len() * 4 / 3 + 5);
                msg.push(char::from(b'0'.wrapping_add(channel)));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut msg);
                Frame::Text(msg)
            }
        }
    }

    /// The channel and payload of a message; `None` for an empty or undecodable one.
    pub fn decode(self, msg: &[u8]) -> Option<(u8, Vec<u8>)> {
        let (&first, rest) = msg.split_first()?;
        match self {
            Codec::Binary => Some((first, rest.to_vec())),
            Codec::Base64 => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((first.wrapping_sub(b'0'), data))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_clients_order_and_defaults_to_unnamed() {
        let p = negotiate(&["v4.channel.k8s.io", "v5.channel.k8s.io"], REMOTE_COMMAND).unwrap();
        assert_eq!((p.name, p.version), ("v4.channel.k8s.io", 4));
        let p = negotiate(&["bogus", " v5.channel.k8s.io"], REMOTE_COMMAND).unwrap();
        assert_eq!(p.version, 5);
        assert_eq!(negotiate(&[], REMOTE_COMMAND).unwrap().name, "");
        assert_eq!(negotiate(&["v5.channel.k8s.io"], PORT_FORWARD), None);
        assert_eq!(negotiate(&["SPDY/3.1"], REMOTE_COMMAND), None);
    }

    #[test]
    fn messages_round_trip_in_both_codecs() {
        assert_eq!(
            Codec::Binary.encode(1, b"hi"),
            Frame::Binary(Bytes::from_static(b"\x01hi"))
        );
        assert_eq!(Codec::Binary.decode(b"\x00abc"), Some((0, b"abc".to_vec())));
        let Frame::Text(t) = Codec::Base64.encode(2, b"foo\n") else {
            panic!("base64 frames are text")
        };
        assert_eq!(t, "2Zm9vCg==");
        assert_eq!(
            Codec::Base64.decode(t.as_bytes()),
            Some((2, b"foo\n".to_vec()))
        );
        assert_eq!(Codec::Base64.decode(b"0!!"), None);
        assert_eq!(Codec::Binary.decode(b""), None);
    }
}
