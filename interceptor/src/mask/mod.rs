//! Masking of secrets in responses (issue 5). Not built yet.
