//! One module per command.

pub mod connect;
