//! fal's JSON forms of the queue's types: result bodies, error types and webhook payloads
//! (shared by the HTTP routes and webhook delivery; HTTP status codes are the HTTP layer's).

use serde_json::{json, Value};

use super::job::{Failure, FailureKind, LogLine, Outcome};

/// fal's `error_type` of a failure.
pub fn error_type(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::InvalidInput => "ValidationError",
        FailureKind::Cancelled => "RequestCancelled",
        FailureKind::Shutdown => "ServerShutdown",
        FailureKind::Timeout => "RequestTimeout",
        FailureKind::Generation => "GenerationError",
        FailureKind::Storage => "StorageError",
        FailureKind::Interrupted => "RunnerInterrupted",
        FailureKind::Internal => "InternalError",
    }
}

/// The result body: the output with stored image paths made absolute on `base_url`; for invalid
/// input fal's `{"detail": [{"loc": ["body", …], "msg", "type"}]}`; otherwise
/// `{"detail": message, "error_type": …}`.
pub fn result_body(outcome: &Outcome, base_url: &str) -> Value {
    match outcome {
        Outcome::Succeeded { response, .. } => {
            let mut response = response.clone();
            for image in &mut response.images {
                if image.url.starts_with('/') {
                    image.url = format!("{base_url}{}", image.url);
                }
            }
            serde_json::to_value(response).unwrap_or(Value::Null)
        }
        Outcome::Failed(failure) => failure_body(failure),
    }
}

/// The body of a failure (see [`result_body`]).
pub fn failure_body(failure: &Failure) -> Value {
    if failure.kind != FailureKind::InvalidInput {
        return json!({"detail": failure.message, "error_type": error_type(failure.kind)});
    }
    pixart_fal::validation_body("body", &failure.fields)
}

/// fal's webhook body: `{request_id, gateway_request_id, status: OK|ERROR, payload, error}`.
pub fn webhook_payload(request_id: &str, base_url: &str, outcome: &Outcome) -> Value {
    let body = result_body(outcome, base_url);
    match outcome.failure() {
        Some(failure) => json!({"request_id": request_id, "gateway_request_id": request_id,
                                "status": "ERROR", "payload": body, "error": failure.message}),
        None => json!({"request_id": request_id, "gateway_request_id": request_id,
                       "status": "OK", "payload": body, "error": null}),
    }
}

/// A log line as fal's status sends it.
pub fn log_line(line: &LogLine) -> Value {
    json!({"message": line.message, "level": line.level, "source": "USER", "timestamp": line.timestamp})
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixart_fal::FieldError;

    #[test]
    fn invalid_input_is_fals_422_detail_list() {
        let failure = Failure::invalid(&[
            FieldError::value("image_size.width", "must be 16..=4096"),
            FieldError::missing("prompt"),
        ]);
        let body = failure_body(&failure);
        assert_eq!(body["detail"][0]["loc"], json!(["body", "image_size", "width"]));
        assert_eq!(body["detail"][1]["type"], "value_error.missing");
        assert!(body.get("error_type").is_none(), "fal's 422 is the detail list alone");
        let hook = webhook_payload("r", "http://h", &Outcome::Failed(failure));
        assert_eq!(hook["status"], "ERROR");
        assert!(hook["error"].as_str().unwrap().contains("image_size.width"));
    }

    #[test]
    fn other_failures_carry_their_error_type() {
        let body = failure_body(&Failure::timed_out());
        assert_eq!(body["error_type"], "RequestTimeout");
        assert!(body["detail"].as_str().unwrap().contains("x-fal-request-timeout"));
    }
}
