//! Session recording and replay (issue 7). Not built yet.
