//! Local CA, leaf certificates, upstream trust (issue 3). Not built yet.
