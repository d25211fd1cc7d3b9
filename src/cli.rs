//! The command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "wxauth",
    version,
    about = "Login backend for WeChat mini-programs: one binary, one config file."
)]
pub struct Cli {
    /// The config file (default: ./config.toml when it exists).
    #[arg(long, global = true, env = "WXAUTH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Check the configuration and exit: 0 when valid, 2 with one line naming the key when not.
    CheckConfig,
}
