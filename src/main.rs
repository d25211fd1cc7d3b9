#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use wxauth::cli::{Cli, Command};
use wxauth::config::Config;
use wxauth::startup::StartError;

/// Exit code for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match Config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("wxauth: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            if let Err(e) = wxauth::tokens::JwtKeys::check(&loaded.config.jwt) {
                eprintln!("wxauth: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            for warning in &loaded.warnings {
                eprintln!("wxauth: warning: {warning}");
            }
            let source = loaded
                .source
                .as_ref()
                .map_or("defaults and environment".to_string(), |p| {
                    p.display().to_string()
                });
            println!("configuration is valid ({source})");
            ExitCode::SUCCESS
        }
        Command::Serve => {
            wxauth::telemetry::init(&loaded.config.log);
            for warning in &loaded.warnings {
                tracing::warn!("{warning}");
            }
            let result = actix_web::rt::System::new().block_on(wxauth::startup::run(loaded));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(StartError::Config(e)) => {
                    eprintln!("wxauth: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("wxauth: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
