//! placeholder
pub mod error;
pub mod node;
pub mod spec;
pub mod state;
pub mod storage;
