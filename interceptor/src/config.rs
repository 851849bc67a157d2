//! config: see DESIGN.md. Not built yet; tracked by its issue.
