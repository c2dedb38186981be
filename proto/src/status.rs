//! gRPC status messages that keep an error's causes: a transport or I/O error often keeps
//! its reason (a refused connection, an untrusted certificate) only in its sources.

/// `err`'s message followed by each cause it does not already spell out.
pub fn message_with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("sending request")]
    struct Transport(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("reading /x: {0}")]
    struct Spelled(#[source] std::io::Error);

    #[test]
    fn causes_are_appended_unless_the_message_spells_them_out() {
        let tls = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert_eq!(
            message_with_causes(&Transport(tls)),
            "sending request: invalid peer certificate: UnknownIssuer"
        );
        let spelled = Spelled(std::io::Error::other("gone"));
        assert_eq!(message_with_causes(&spelled), "reading /x: gone");
    }
}
