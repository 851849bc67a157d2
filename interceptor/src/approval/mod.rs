//! Just-in-time approval (issue 6). Not built yet.
