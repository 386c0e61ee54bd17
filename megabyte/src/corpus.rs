//! Reading a training corpus from disk.

use crate::error::Error;

/// Every regular file under `path` (or `path` itself), concatenated in path order.
pub fn read_corpus(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let io = |source, p: &std::path::Path| Error::Io {
        path: p.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| io(e, path))?;
    if meta.is_file() {
        return std::fs::read(path).map_err(|e| io(e, path));
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io(e, &dir))? {
            let p = entry.map_err(|e| io(e, &dir))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut data = Vec::new();
    for f in files {
        data.extend(std::fs::read(&f).map_err(|e| io(e, &f))?);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files under nested directories come back concatenated in path order (not the order
    /// the directory lists them in), a single file as itself, a missing path as an error
    /// naming it.
    #[test]
    fn a_corpus_is_its_files_in_path_order() {
        let root = std::env::temp_dir().join(format!("megabyte_corpus_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("b/inner")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("b/inner/z.txt"), b"3").unwrap();
        std::fs::write(root.join("b/c.txt"), b"2").unwrap();
        std::fs::write(root.join("a/y.txt"), b"1").unwrap();
        std::fs::write(root.join("d.txt"), b"4").unwrap();
        assert_eq!(read_corpus(&root).unwrap(), b"1234");
        assert_eq!(read_corpus(&root.join("b/c.txt")).unwrap(), b"2");
        let missing = root.join("missing");
        let err = read_corpus(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
