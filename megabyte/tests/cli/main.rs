//! The `megabyte` program as a user meets it: output of each command, the `cpu` and `wgpu`
//! devices agreeing, and one-line errors with a non-zero exit for bad input.

mod commands;
mod common;
mod errors;
mod shipped;
mod train;
