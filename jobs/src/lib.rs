//! Shared wiring for Tripwire's job binaries.
