//! Paths the program reads and writes: resolving them, refusing outputs that would destroy data, prompts and corpora.

use std::io::Read;
use std::path::{Path, PathBuf};

use megabyte::checkpoint;
use megabyte::Error;

/// `path` made absolute with every link resolved; a path that does not exist yet resolves its
/// folder (which must exist) and keeps its file name.
pub(crate) fn resolved(path: &Path, what: &str) -> Result<PathBuf, Error> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Ok(p);
    }
    let name = path.file_name().ok_or_else(|| Error::Output {
        path: path.display().to_string(),
        reason: format!("{what} names a folder, not a file"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| Error::Output {
        path: path.display().to_string(),
        reason: format!("its folder {} cannot be used: {e}", dir.display()),
    })?;
    Ok(dir.join(name))
}

/// Refuses an output path that would destroy what the run did not make, unless `force`: the
/// training data itself, any file inside the data folder (the next run would train on its own
/// checkpoint), an existing file that is not a checkpoint. Then proves the folder writable
/// (a file is created there and removed), so a run does not train for hours only to fail at
/// its first save. Paths are compared resolved, so `./a`, `a` and links to it are one file.
pub(crate) fn check_out(out: &Path, data: Option<&Path>, force: bool) -> Result<PathBuf, Error> {
    let refuse = |reason: String| {
        Err(Error::Output {
            path: out.display().to_string(),
            reason: format!("{reason}; give --force to write it anyway"),
        })
    };
    let target = resolved(out, "--out")?;
    if target.is_dir() {
        return Err(Error::Output {
            path: out.display().to_string(),
            reason: "is a folder; name the checkpoint file to write".into(),
        });
    }
    if let Some(data) = data {
        let data = std::fs::canonicalize(data).map_err(|source| Error::Io {
            path: data.display().to_string(),
            source,
        })?;
        if !force && target == data {
            return refuse("is the training data".into());
        }
        if !force && data.is_dir() && target.starts_with(&data) {
            return refuse(format!(
                "is inside the --data folder {}, so a later run would train on it",
                data.display()
            ));
        }
    }
    if !force && target.is_file() && !checkpoint::is_checkpoint(&target)? {
        return refuse("exists and is not a megabyte checkpoint".into());
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    let probe = dir.join(format!(".megabyte-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| Error::Output {
            path: out.display().to_string(),
            reason: format!("its folder {} is not writable: {e}", dir.display()),
        })?;
    Ok(target)
}

pub(crate) fn read_prompt(arg: Option<String>) -> Result<Vec<u8>, Error> {
    match arg.as_deref() {
        Some("-") | None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|source| Error::Io {
                    path: "stdin".into(),
                    source,
                })?;
            Ok(buf)
        }
        Some(p) => Ok(p.as_bytes().to_vec()),
    }
}
