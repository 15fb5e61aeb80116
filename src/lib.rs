//! Conformance matrix of RUSM cluster. This crate has no code of its own: its `tests/` run every
//! behaviour of the cluster once per transport backend.
