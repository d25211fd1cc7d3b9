//! The loader: defaults, then the file, then the environment (figment); secret files.

use super::*;
use figment::providers::{Env, Format, Toml};
use figment::Figment;

impl Config {
    /// Which file to read: the explicit path (flag or `WXAUTH_CONFIG`), else
    /// `./config.toml` when it exists, else none (defaults and environment only).
    pub fn locate(explicit: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
        match explicit {
            Some(path) if path.is_file() => Ok(Some(path.to_path_buf())),
            Some(path) => Err(ConfigError::new(
                "--config",
                format!("{} does not exist or is not a file", path.display()),
            )),
            None => {
                let default = Path::new(DEFAULT_CONFIG_FILE);
                Ok(default.is_file().then(|| default.to_path_buf()))
            }
        }
    }

    /// The file (if any) and the environment, over the defaults.
    fn merged(explicit: Option<&Path>) -> Result<(Figment, Option<PathBuf>), ConfigError> {
        let source = Self::locate(explicit)?;
        let mut figment = Figment::new();
        if let Some(path) = &source {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(not_empty_in_env())
                .split("__")
                .ignore(&["config"]),
        );
        Ok((figment, source))
    }

    /// Loads and validates everything the server needs, secret files included.
    pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
        let (figment, source) = Self::merged(explicit)?;
        let config: Config = figment.extract().map_err(from_figment)?;
        let mut warnings = unknown_keys(&figment);
        let apps = config.validate(&mut warnings)?;
        let mut config = config;
        config.storage.postgres = config.storage.resolve_postgres(&mut warnings)?;
        let token_endpoint_secret = config.token_endpoint_secret()?;
        Ok(Loaded {
            config,
            apps,
            token_endpoint_secret,
            warnings,
            source,
        })
    }

    /// For the admin commands: only what they use (where the data and the server
    /// are), so an operator needs no access to the WeChat secret or TLS key files.
    pub fn load_for_admin(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (figment, _) = Self::merged(explicit)?;
        let config: Config = figment.extract().map_err(from_figment)?;
        if config.storage.path.as_os_str().is_empty() {
            return Err(ConfigError::new("storage.path", "must not be empty"));
        }
        let mut config = config;
        config.storage.postgres = config.storage.resolve_postgres(&mut Vec::new())?;
        Ok(config)
    }
}

/// For `Env::filter` (which sees names with the prefix already taken off): keeps a
/// `WXAUTH_` variable unless its value is empty. An empty variable means unset, the
/// way operators blank one and systemd's `Environment=NAME=` writes one; to turn
/// something off, set the documented value (`metrics.bind = "off"`, for one).
pub(super) fn not_empty_in_env() -> impl Fn(&figment::value::UncasedStr) -> bool + Clone + 'static {
    let blank: Vec<String> = std::env::vars_os()
        .filter(|(_, value)| value.is_empty())
        .filter_map(|(name, _)| {
            let name = name.to_str()?.trim();
            let prefix = name.get(..ENV_PREFIX.len())?;
            prefix
                .eq_ignore_ascii_case(ENV_PREFIX)
                .then(|| name[ENV_PREFIX.len()..].to_string())
        })
        .collect();
    move |key| !blank.iter().any(|b| b.as_str() == key.as_str())
}

pub(super) fn resolve_app(key: &str, creds: &AppCredentials) -> Result<WeChatApp, ConfigError> {
    let appid = match creds.appid.as_deref() {
        Some(a) if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            a.to_string()
        }
        Some(_) => {
            return Err(ConfigError::new(
                format!("{key}.appid"),
                "must be letters, digits or _",
            ))
        }
        None => {
            return Err(ConfigError::new(
                format!("{key}.appid"),
                "is required when a secret is set",
            ))
        }
    };
    let secret = match (&creds.secret, &creds.secret_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                format!("{key}.secret_file"),
                "set either secret or secret_file, not both",
            ))
        }
        (Some(secret), None) => secret.clone(),
        (None, Some(path)) => read_secret_file(&format!("{key}.secret_file"), path)?,
        (None, None) => {
            return Err(ConfigError::new(
                format!("{key}.secret"),
                format!("is required for appid {appid} (or {key}.secret_file)"),
            ))
        }
    };
    if secret.expose().is_empty() {
        return Err(ConfigError::new(
            format!("{key}.secret"),
            "must not be empty",
        ));
    }
    Ok(WeChatApp { appid, secret })
}

/// Reads a secret from a file (trailing newline removed). A relative path is looked
/// up in systemd's `$CREDENTIALS_DIRECTORY` first, which is where `LoadCredential=` puts it.
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let path = resolve_credential_path(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

pub fn resolve_credential_path(path: &Path) -> PathBuf {
    if path.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&dir).join(path);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    path.to_path_buf()
}

pub(super) fn from_figment(err: figment::Error) -> ConfigError {
    let key = if err.path.is_empty() {
        "config".to_string()
    } else {
        err.path.join(".")
    };
    let origin = err
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(src) => format!(" (from {src})"),
            None => format!(" (from {})", m.name),
        })
        .unwrap_or_default();
    // Parse errors come with a multi-line source excerpt: keep the first line
    // (where) and the last (what), so the error stays one line.
    let kind = err.kind.to_string();
    let lines: Vec<&str> = kind
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let reason = match lines.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        [first, .., last] => format!("{first}: {last}"),
    };
    ConfigError::new(key, format!("{reason}{origin}"))
}

/// Every key that the merged sources set but [`Config`] does not know, as a warning
/// that names the key and where it came from.
pub(super) fn unknown_keys(figment: &Figment) -> Vec<String> {
    let Ok(value) = figment.extract::<figment::value::Value>() else {
        return Vec::new();
    };
    let mut unknown = Vec::new();
    let _: Result<Config, _> =
        serde_ignored::deserialize(&value, |path| unknown.push(path.to_string()));
    unknown
        .into_iter()
        .map(|key| {
            let origin = figment
                .find_metadata(&key)
                .map(|m| match &m.source {
                    Some(src) => format!("from {src}"),
                    None => format!("from {}", m.name),
                })
                .unwrap_or_else(|| "source unknown".into());
            let hint = if origin.contains("environment") {
                format!(
                    " (variable {ENV_PREFIX}{})",
                    key.to_uppercase().replace('.', "__")
                )
            } else {
                String::new()
            };
            format!("unknown config key `{key}` ignored, {origin}{hint}")
        })
        .collect()
}
