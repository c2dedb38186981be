//! The wire-independent face of a remote command: input and resize events coming in,
//! output going out as chunks tagged with the transport's stream ID, and the command's end.

use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

/// A terminal size from the resize channel (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct TermSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// One output stream: chunks go to the transport's queue tagged with `id`.
#[derive(Debug, Clone)]
pub struct Output {
    id: u32,
    tx: mpsc::Sender<(u32, Bytes)>,
}

impl Output {
    /// The stream `id` of the transport fed by `tx`.
    pub fn new(id: u32, tx: mpsc::Sender<(u32, Bytes)>) -> Self {
        Self { id, tx }
    }

    /// Queues one chunk; false once the transport is gone.
    pub async fn send(&self, data: Bytes) -> bool {
        self.tx.send((self.id, data)).await.is_ok()
    }
}

/// The streams of one Exec or Attach, as the request asked for them. An input channel that
/// closes means end of input.
#[derive(Debug)]
pub struct Streams {
    /// Standard input, if requested.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Standard output, if requested.
    pub stdout: Option<Output>,
    /// Standard error, if requested (never with a TTY).
    pub stderr: Option<Output>,
    /// Terminal resizes (TTY only).
    pub resize: Option<mpsc::Receiver<TermSize>>,
    /// Resolves once the client is gone: the command is then killed.
    pub client_gone: oneshot::Receiver<()>,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and exited with this code.
    Exited(i32),
    /// It could not be run or followed.
    Failed(String),
}

impl Outcome {
    /// The `metav1.Status` the v4/v5 protocols write on the error channel.
    pub fn status_json(&self) -> String {
        let status = match self {
            Outcome::Exited(0) => json!({"metadata": {}, "status": "Success"}),
            Outcome::Exited(code) => json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Outcome::Failed(msg) => json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("Internal error occurred: error executing command in container: {msg}"),
                "reason": "InternalError",
                "details": {"causes": [{"message": format!("error executing command in container: {msg}")}]},
                "code": 500,
            }),
        };
        status.to_string()
    }

    /// What the pre-v4 protocols write on the error channel: nothing on success, else a message.
    pub fn plain_message(&self) -> Option<String> {
        match self {
            Outcome::Exited(0) => None,
            Outcome::Exited(code) => Some(format!("command terminated with exit code {code}")),
            Outcome::Failed(msg) => Some(format!("error executing command in container: {msg}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_kubernetes_status_objects() {
        assert_eq!(
            Outcome::Exited(0).status_json(),
            r#"{"metadata":{},"status":"Success"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&Outcome::Exited(3).status_json()).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let v: serde_json::Value =
            serde_json::from_str(&Outcome::Failed("boom".into()).status_json()).unwrap();
        assert_eq!(
            (v["reason"].as_str(), v["code"].as_i64()),
            (Some("InternalError"), Some(500))
        );
        assert_eq!(Outcome::Exited(0).plain_message(), None);
        assert!(Outcome::Exited(2)
            .plain_message()
            .unwrap()
            .contains("exit code 2"));
    }

    #[test]
    fn resize_events_parse_from_the_kubernetes_json() {
        let size: TermSize = serde_json::from_str(r#"{"Width":120,"Height":40}"#).unwrap();
        assert_eq!(
            size,
            TermSize {
                width: 120,
                height: 40
            }
        );
    }
}
