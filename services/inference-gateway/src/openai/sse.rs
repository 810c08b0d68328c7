//! Server-sent events framing: each event is one `data:` line and a blank line, and a stream
//! ends with `data: [DONE]`, which is what OpenAI clients wait for.

use bytes::Bytes;

/// One event carrying `payload` as JSON.
pub fn event(payload: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {payload}\n\n"))
}

/// The event that ends every stream.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_data_line_then_a_blank_line() {
        // serde_json writes no newline inside a compact value, so the payload stays one line
        // even when a string holds "\n" (escaped as two characters).
        let frame = event(&serde_json::json!({"text": "a\nb"}));
        assert_eq!(&frame[..], b"data: {\"text\":\"a\\nb\"}\n\n");
        assert_eq!(&done()[..], b"data: [DONE]\n\n");
    }
}
