#![forbid(unsafe_code)]

use clap::Parser;
use std::path::Path;
use std::process::ExitCode;
use wxauth::admin::Request;
use wxauth::cause::cause_chain;
use wxauth::cli::{
    Cli, Command, EventsCommand, KeysCommand, TokensCommand, UsersCommand, WechatCommand,
};
use wxauth::config::{Config, ConfigError};
use wxauth::startup::StartError;

/// jemalloc: see Cargo.toml. Its background thread (turned on first thing in `main`)
/// returns freed pages to the system after a few seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a configuration that cannot be used.
const EXIT_CONFIG: u8 = 2;
/// Exit code after a panic while serving (EX_SOFTWARE): the service manager
/// restarts the process (`Restart=on-failure`).
const EXIT_PANIC: i32 = 70;

fn main() -> ExitCode {
    // Before anything is created: every file and directory this process makes (the
    // data directory, sled's files, the admin socket, a backup) is owner-only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Without it, freed pages wait for the next allocations in the same arena.
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
    let mut cli = Cli::parse();
    let command = cli.command.take();
    let config = cli.config_file();
    match command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::CheckConfig => check_config(config),
        Command::Keygen { algorithm } => {
            print!("{}", wxauth::cli::generate_key(algorithm));
            ExitCode::SUCCESS
        }
        Command::Users(users) => {
            let request = match users {
                UsersCommand::List => Request::UsersList,
                UsersCommand::Show { id } => Request::UsersShow { id },
                UsersCommand::Sessions { id } => Request::UsersSessions { id },
                UsersCommand::Export { id } => Request::UsersExport { id },
                UsersCommand::Delete { id, now } => Request::UsersDelete { id, now },
                UsersCommand::Disable { id } => Request::UsersSetDisabled { id, disabled: true },
                UsersCommand::Enable { id } => Request::UsersSetDisabled {
                    id,
                    disabled: false,
                },
                UsersCommand::CheckSession { id } => Request::UsersCheckSession { id },
            };
            admin(config, &request, &mut std::io::stdout().lock())
        }
        Command::Tokens(TokensCommand::Revoke { user }) => admin(
            config,
            &Request::TokensRevoke { user },
            &mut std::io::stdout().lock(),
        ),
        Command::Events(events) => {
            let request = match events {
                EventsCommand::List => Request::EventsList,
                EventsCommand::Retry => Request::EventsRetry,
            };
            admin(config, &request, &mut std::io::stdout().lock())
        }
        Command::Wechat(WechatCommand::Token { appid }) => admin(
            config,
            &Request::WechatToken { appid },
            &mut std::io::stdout().lock(),
        ),
        Command::Keys(keys) => {
            let request = match keys {
                KeysCommand::List => Request::KeysList,
                KeysCommand::Retire { kid } => Request::KeysRetire { kid },
                KeysCommand::Activate { kid } => Request::KeysActivate { kid },
                KeysCommand::Rotate { key_file: None } => Request::KeysRotate { key: None },
                KeysCommand::Rotate {
                    key_file: Some(path),
                } => match std::fs::read_to_string(&path) {
                    Ok(text) => Request::KeysRotate {
                        key: Some(wxauth::secret::Secret::new(text.trim_end())),
                    },
                    Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
                },
            };
            admin(config, &request, &mut std::io::stdout().lock())
        }
        Command::Backup { file } => {
            // The snapshot holds the signing key and session keys: owner-only.
            use std::os::unix::fs::OpenOptionsExt;
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file);
            match opened {
                Ok(out) => admin(config, &Request::Backup, &mut std::io::BufWriter::new(out)),
                Err(e) => fail(format!("cannot create {}: {e}", file.display())),
            }
        }
        Command::Restore { file } => with_admin_config(config, |cfg| {
            let storage = &cfg.storage;
            match wxauth::admin::restore(&file, storage) {
                Ok(entries) => {
                    match storage.backend {
                        wxauth::config::StorageBackend::Sled => {
                            println!("restored {entries} entries into {}", storage.path.display())
                        }
                        wxauth::config::StorageBackend::Postgres => {
                            println!("restored {entries} entries into the PostgreSQL database")
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(cause_chain(&e)),
            }
        }),
        Command::Healthcheck => {
            with_admin_config(config, |cfg| match wxauth::cli::healthcheck(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("unhealthy: {e}")),
            })
        }
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("wxauth: {message}");
    ExitCode::FAILURE
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("wxauth: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn serve(config: Option<&Path>) -> ExitCode {
    let loaded = match Config::load(config) {
        Ok(loaded) => loaded,
        Err(e) => return config_error(e),
    };
    wxauth::telemetry::init(&loaded.config.log);
    exit_on_panic();
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    match actix_web::rt::System::new().block_on(wxauth::startup::run(loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(e)) => config_error(e),
        Err(e) => {
            let message = cause_chain(&e);
            tracing::error!("{message}");
            fail(message)
        }
    }
}

/// Crash-only: a panic anywhere in the server (an owner actor, the commit thread, a
/// worker) ends the process with [`EXIT_PANIC`] rather than leaving it running
/// without that part. Nothing is lost by exiting: every answered change is already
/// durable, and storage recovers on start as after `kill -9`. The log line carries
/// the panic's message and location only, never a backtrace or any state.
fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info.location().map_or_else(
            || "unknown".to_string(),
            |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
        );
        tracing::error!(
            panic_message = message,
            location,
            exit_code = EXIT_PANIC,
            "panic: exiting so that the service manager restarts wxauth"
        );
        std::process::exit(EXIT_PANIC);
    }));
}

/// Everything `serve` would refuse, without starting: secret files, the signing
/// key file and the TLS files included.
fn check_config(config: Option<&Path>) -> ExitCode {
    let loaded = match Config::load(config) {
        Ok(loaded) => loaded,
        Err(e) => return config_error(e),
    };
    let cfg = &loaded.config;
    if let Err(e) = wxauth::tokens::JwtKeys::check(&cfg.jwt) {
        return config_error(e);
    }
    if let (Some(cert), Some(key)) = (&cfg.server.tls.cert, &cfg.server.tls.key) {
        if let Err(e) = wxauth::tls::server_config(cert, key) {
            return config_error(e);
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

/// Admin commands read only the parts of the config they use: an operator needs
/// no access to the WeChat secret or the TLS key to list users.
fn with_admin_config(config: Option<&Path>, run: impl FnOnce(&Config) -> ExitCode) -> ExitCode {
    match Config::load_for_admin(config) {
        Ok(cfg) => run(&cfg),
        Err(e) => config_error(e),
    }
}

fn admin(config: Option<&Path>, request: &Request, out: &mut dyn std::io::Write) -> ExitCode {
    with_admin_config(config, |cfg| {
        match wxauth::admin::run(request, cfg, out).and_then(|()| Ok(out.flush()?)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(cause_chain(&e)),
        }
    })
}
