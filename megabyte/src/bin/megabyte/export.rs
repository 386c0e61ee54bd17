//! `megabyte export`: a checkpoint's weights alone.

use std::path::Path;

use megabyte::checkpoint;
use megabyte::Error;

use crate::{args::*, files::*};

pub(crate) fn export(from: &Path, out: &Path, dtype: DtypeArg, force: bool) -> Result<(), Error> {
    let source = std::fs::canonicalize(from).map_err(|source| Error::Io {
        path: from.display().to_string(),
        source,
    })?;
    if resolved(out, "--out")? == source {
        return Err(Error::Output {
            path: out.display().to_string(),
            reason: "is the input checkpoint; write the weights to another file".into(),
        });
    }
    check_out(out, None, force)?;
    let ckpt = checkpoint::load(from)?;
    checkpoint::save(out, &ckpt.config, &ckpt.weights, dtype.into())?;
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({} parameters, {size} bytes; dropped {} optimiser tensors)",
        out.display(),
        ckpt.config.num_parameters(),
        ckpt.optimizer.len()
    );
    Ok(())
}
