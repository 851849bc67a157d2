//! audit.k8s.io/v1 export (issue 7). Not built yet.
