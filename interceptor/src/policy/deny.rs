//! Refusals as Kubernetes `Status` objects: 403 Forbidden, `details` naming
//! the object, a cause naming the policy rule, and a message that tells the
//! agent what it may do instead. kubectl prints it as
//! `Error from server (Forbidden): <message>`.

use crate::kstatus::Status;
use crate::request::RequestInfo;

use super::{Action, Decision, PolicyInput, PolicySet};

/// The `details.causes[].reason` that carries `policy "P" rule "R"`.
pub const RULE_CAUSE: &str = "ChaperonePolicyRule";

/// The 403 for a request whose decision refuses it: a `deny`, or an
/// `approve` (see [`approval_required_status`]).
pub fn refusal_status(set: &PolicySet, input: &PolicyInput<'_>, decision: &Decision) -> Status {
    if decision.enforce == Action::Approve {
        approval_required_status(set, input, decision)
    } else {
        deny_status(set, input, decision)
    }
}

/// The 403 for a denied request.
pub fn deny_status(set: &PolicySet, input: &PolicyInput<'_>, decision: &Decision) -> Status {
    let req = input.request;
    let target = describe_target(req);
    let mut message = if decision.policy.is_empty() {
        format!(
            "chaperone: no AgentPolicy selects {}, so {} on {target} is denied",
            caller_name(input),
            req.verb
        )
    } else {
        format!(
            "chaperone: policy \"{}\" rule \"{}\" denies {} on {target}",
            decision.policy, decision.rule, req.verb
        )
    };
    push_rule_message(&mut message, decision);
    push_alternatives(&mut message, set, input);
    message.push_str("; ask a human to run it");
    with_details(Status::forbidden(message), req, decision)
}

/// The 403 for a request an `approve` rule holds, while chaperone cannot
/// take approvals: it is refused, never allowed.
pub fn approval_required_status(
    set: &PolicySet,
    input: &PolicyInput<'_>,
    decision: &Decision,
) -> Status {
    let req = input.request;
    let mut message = approval_required_message(decision, req);
    push_rule_message(&mut message, decision);
    push_alternatives(&mut message, set, input);
    message.push_str("; ask a human to run it");
    with_details(Status::forbidden(message), req, decision)
}

/// `chaperone: approval required: policy "P" rule "R" holds VERB on TARGET
/// for a human's approval, and approvals are not available yet`.
pub fn approval_required_message(decision: &Decision, request: &RequestInfo) -> String {
    format!(
        "chaperone: approval required: policy \"{}\" rule \"{}\" holds {} on {} for a human's approval, and approvals are not available yet",
        decision.policy,
        decision.rule,
        request.verb,
        describe_target(request)
    )
}

/// `deployments.apps "web" in namespace "prod-a"`, `pods/exec "web-0" in
/// namespace "prod"`, `nodes`, or `/metrics` for a non-resource URL.
pub fn describe_target(req: &RequestInfo) -> String {
    if !req.is_resource_request {
        return req.path.clone();
    }
    let mut target = req.resource_path().into_owned();
    if !req.api_group.is_empty() {
        target.push('.');
        target.push_str(&req.api_group);
    }
    if !req.name.is_empty() {
        target.push_str(&format!(" \"{}\"", req.name));
    }
    let is_the_namespace_itself = req.resource == "namespaces" && req.name == req.namespace;
    if !req.namespace.is_empty() && !is_the_namespace_itself {
        target.push_str(&format!(" in namespace \"{}\"", req.namespace));
    }
    target
}

fn caller_name(input: &PolicyInput<'_>) -> String {
    if input.caller.username.is_empty() {
        "this agent".into()
    } else {
        format!("this agent ({})", input.caller.username)
    }
}

fn push_rule_message(message: &mut String, decision: &Decision) {
    if let Some(rule_message) = &decision.message {
        message.push_str(": ");
        message.push_str(rule_message.trim_end_matches(['.', ' ']));
    }
}

fn push_alternatives(message: &mut String, set: &PolicySet, input: &PolicyInput<'_>) {
    if !input.request.is_resource_request {
        return;
    }
    let verbs = set.allowed_verbs(input);
    if verbs.is_empty() {
        message.push_str(&format!(
            "; this agent may not use {} here at all",
            input.request.resource_path()
        ));
    } else {
        message.push_str("; this agent may ");
        message.push_str(&join_words(&verbs));
        message.push_str(" here");
    }
}

/// `a`, `a and b`, `a, b and c`.
fn join_words(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

fn with_details(status: Status, req: &RequestInfo, decision: &Decision) -> Status {
    let status = status.with_details(&req.api_group, &req.resource, &req.name);
    if decision.policy.is_empty() {
        status.with_cause(RULE_CAUSE, "no policy selects this caller")
    } else {
        status.with_cause(
            RULE_CAUSE,
            format!("policy \"{}\" rule \"{}\"", decision.policy, decision.rule),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_join_like_a_sentence() {
        assert_eq!(join_words(&["get"]), "get");
        assert_eq!(join_words(&["get", "list"]), "get and list");
        assert_eq!(join_words(&["get", "list", "watch"]), "get, list and watch");
    }

    #[test]
    fn targets_read_like_kubectl_names_them() {
        let parse = |m: http::Method, p: &str| RequestInfo::parse(&m, p, None);
        assert_eq!(
            describe_target(&parse(
                http::Method::DELETE,
                "/apis/apps/v1/namespaces/prod-a/deployments/web"
            )),
            "deployments.apps \"web\" in namespace \"prod-a\""
        );
        assert_eq!(
            describe_target(&parse(http::Method::DELETE, "/api/v1/namespaces/prod-a")),
            "namespaces \"prod-a\""
        );
        assert_eq!(
            describe_target(&parse(
                http::Method::POST,
                "/api/v1/namespaces/prod/pods/web-0/exec"
            )),
            "pods/exec \"web-0\" in namespace \"prod\""
        );
        assert_eq!(
            describe_target(&parse(http::Method::GET, "/metrics")),
            "/metrics"
        );
    }
}
