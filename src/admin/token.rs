//! The admin token: configured, or generated once and kept in the data dir.

use std::io::Write;
use std::path::Path;

/// Where the admin token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `[admin] token` or `COURIER_ADMIN_TOKEN`.
    Configured,
    /// `<data_dir>/admin.token`, written by an earlier start.
    File,
    /// Generated now and written to `<data_dir>/admin.token`.
    Generated,
}

/// The file a generated token is kept in.
pub const TOKEN_FILE: &str = "admin.token";

/// The configured token, else the one stored in `data_dir`, else a new
/// one (stored there, readable by the owner only).
pub fn resolve_token(
    configured: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<(String, TokenSource)> {
    if let Some(token) = configured {
        return Ok((token.to_owned(), TokenSource::Configured));
    }
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => {
            return Ok((text.trim().to_owned(), TokenSource::File));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // A cluster node on Redis has not made its data dir (sled does that).
    std::fs::create_dir_all(data_dir)?;
    let token = crate::broker::random_hex::<24>();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path)?;
    file.write_all(token.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok((token, TokenSource::Generated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_read_back_and_configured_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (first, source) = resolve_token(None, dir.path()).unwrap();
        assert_eq!(source, TokenSource::Generated);
        assert_eq!(first.len(), 48);
        let (again, source) = resolve_token(None, dir.path()).unwrap();
        assert_eq!(
            (again.as_str(), source),
            (first.as_str(), TokenSource::File)
        );
        let (set, source) = resolve_token(Some("configured-token-123"), dir.path()).unwrap();
        assert_eq!(
            (set.as_str(), source),
            ("configured-token-123", TokenSource::Configured)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
