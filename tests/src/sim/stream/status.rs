//! The `Status` a kubelet writes on the error stream when a process ends
//! (remotecommand protocol v4 and later), byte for byte as Go's
//! `json.Marshal(metav1.Status)` renders it.

/// Success, or the failure with the exit code that kubectl turns into its own
/// exit code.
pub fn exit_status(argv: &[String], code: i32) -> String {
    if code == 0 {
        return r#"{"metadata":{},"status":"Success"}"#.to_string();
    }
    // containerd's streaming exec error, wrapped by the kubelet.
    let message = format!(
        "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
        argv.join(" ")
    );
    serde_json::json!({
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
    .to_string()
}

/// An error before the process could run (`apierrors.NewInternalError`).
pub fn internal_error(message: &str) -> String {
    serde_json::json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("Internal error occurred: {message}"),
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_and_failure_render_as_the_kubelet_does() {
        assert_eq!(exit_status(&[], 0), r#"{"metadata":{},"status":"Success"}"#);
        let argv = ["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
        assert_eq!(
            exit_status(&argv, 3),
            r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
        );
    }
}
