//! The HTTP proxy (issue 3). Not built yet.
