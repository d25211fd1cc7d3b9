#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use wxauth::admin::Request;
use wxauth::cli::{Cli, Command, TokensCommand, UsersCommand};
use wxauth::config::Config;
use wxauth::startup::StartError;

/// Exit code for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keygen { algorithm }) = cli.command {
        print!("{}", wxauth::cli::generate_key(algorithm));
        return ExitCode::SUCCESS;
    }
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
            if let (Some(cert), Some(key)) = (
                &loaded.config.server.tls.cert,
                &loaded.config.server.tls.key,
            ) {
                if let Err(e) = wxauth::tls::server_config(cert, key) {
                    eprintln!("wxauth: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
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
        Command::Users(users) => {
            let request = match users {
                UsersCommand::List => Request::UsersList,
                UsersCommand::Show { id } => Request::UsersShow { id },
                UsersCommand::Disable { id } => Request::UsersSetDisabled { id, disabled: true },
                UsersCommand::Enable { id } => Request::UsersSetDisabled {
                    id,
                    disabled: false,
                },
            };
            admin(&request, &loaded.config, &mut std::io::stdout().lock())
        }
        Command::Tokens(TokensCommand::Revoke { user }) => admin(
            &Request::TokensRevoke { user },
            &loaded.config,
            &mut std::io::stdout().lock(),
        ),
        Command::Backup { file } => {
            // The snapshot holds the signing key and session keys: owner-only.
            use std::os::unix::fs::OpenOptionsExt;
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file);
            match opened {
                Ok(out) => admin(
                    &Request::Backup,
                    &loaded.config,
                    &mut std::io::BufWriter::new(out),
                ),
                Err(e) => {
                    eprintln!("wxauth: cannot create {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Restore { file } => {
            let storage = &loaded.config.storage;
            match wxauth::admin::restore(&file, &storage.path, storage.cache_capacity) {
                Ok(entries) => {
                    println!("restored {entries} entries into {}", storage.path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("wxauth: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Healthcheck => match wxauth::cli::healthcheck(&loaded.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wxauth: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Keygen { .. } => unreachable!("handled before the config is loaded"),
    }
}

fn admin(
    request: &Request,
    config: &wxauth::config::Config,
    out: &mut dyn std::io::Write,
) -> ExitCode {
    match wxauth::admin::run(request, config, out).and_then(|()| Ok(out.flush()?)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wxauth: {e}");
            ExitCode::FAILURE
        }
    }
}
