//! Checkpoints: a model's config and weights in one safetensors file.
//!
//! Tensor names, shapes and order are those of [`Config::tensor_specs`]; the config is stored
//! field by field in the file's string metadata, next to `format = megabyte-rs` and
//! `format_version = 1`. Weights are stored as f32 or f16 and always loaded as f32.
//! `docs/CHECKPOINT.md` documents the layout.
//!
//! Loading checks the format, every config field, and every tensor's name, dtype and shape,
//! and reports the first mismatch precisely. Tensors whose names start with `optimizer.` are
//! left for the trainer and ignored here; any other tensor the config does not expect is an
//! error.

use std::collections::HashMap;
use std::path::Path;

use megabyte_reference::{Activation, Config, Weights};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::error::Error;

/// The value of the `format` metadata key.
pub const FORMAT: &str = "megabyte-rs";
/// The value of the `format_version` metadata key this code writes and reads.
pub const FORMAT_VERSION: &str = "1";
/// Names starting with this prefix are reserved for optimiser state.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";

/// How weights are stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
}

impl StorageDtype {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(StorageDtype::F32),
            "f16" => Some(StorageDtype::F16),
            _ => None,
        }
    }
}

fn bad(path: &str, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// The config as metadata entries.
pub fn config_metadata(cfg: &Config) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("format".into(), FORMAT.into());
    m.insert("format_version".into(), FORMAT_VERSION.into());
    for (key, value) in [
        ("vocab", cfg.vocab),
        ("patch", cfg.patch),
        ("context", cfg.context),
        ("d_global", cfg.d_global),
        ("d_local", cfg.d_local),
        ("layers_global", cfg.layers_global),
        ("layers_local", cfg.layers_local),
        ("heads_global", cfg.heads_global),
        ("heads_local", cfg.heads_local),
        ("ffn_mult", cfg.ffn_mult),
    ] {
        m.insert(key.into(), value.to_string());
    }
    m.insert("activation".into(), cfg.activation.name().into());
    m.insert("tied_head".into(), cfg.tied_head.to_string());
    m.insert("local_positions".into(), cfg.local_positions.to_string());
    m
}

/// Reads and validates the config from metadata entries.
pub fn config_from_metadata(path: &str, m: &HashMap<String, String>) -> Result<Config, Error> {
    let get = |key: &str| {
        m.get(key)
            .map(String::as_str)
            .ok_or_else(|| bad(path, format!("metadata key `{key}` is missing")))
    };
    match get("format")? {
        FORMAT => {}
        other => {
            return Err(bad(
                path,
                format!("metadata `format` is `{other}`, expected `{FORMAT}`"),
            ))
        }
    }
    match get("format_version")? {
        FORMAT_VERSION => {}
        other => {
            return Err(bad(
                path,
                format!(
                "metadata `format_version` is `{other}`; this build reads version {FORMAT_VERSION}"
            ),
            ))
        }
    }
    let num = |key: &str| -> Result<usize, Error> {
        let v = get(key)?;
        v.parse().map_err(|_| {
            bad(
                path,
                format!("metadata `{key}` = `{v}` is not a non-negative integer"),
            )
        })
    };
    let flag = |key: &str| -> Result<bool, Error> {
        match get(key)? {
            "true" => Ok(true),
            "false" => Ok(false),
            v => Err(bad(
                path,
                format!("metadata `{key}` = `{v}` is not `true` or `false`"),
            )),
        }
    };
    let act = get("activation")?;
    let cfg = Config {
        vocab: num("vocab")?,
        patch: num("patch")?,
        context: num("context")?,
        d_global: num("d_global")?,
        d_local: num("d_local")?,
        layers_global: num("layers_global")?,
        layers_local: num("layers_local")?,
        heads_global: num("heads_global")?,
        heads_local: num("heads_local")?,
        ffn_mult: num("ffn_mult")?,
        activation: Activation::from_name(act).ok_or_else(|| {
            bad(
                path,
                format!("metadata `activation` = `{act}` is not `gelu` or `relu`"),
            )
        })?,
        tied_head: flag("tied_head")?,
        local_positions: flag("local_positions")?,
    };
    cfg.validate()
        .map_err(|e| bad(path, format!("stored config is invalid: {e}")))?;
    Ok(cfg)
}

/// Little-endian bytes of `data` stored as `dtype`.
pub fn encode(data: &[f32], dtype: StorageDtype) -> Vec<u8> {
    match dtype {
        StorageDtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        StorageDtype::F16 => data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// f32 values of a stored F32 or F16 tensor.
pub fn decode(path: &str, name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, Error> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F16 => Ok(data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()),
        other => Err(bad(
            path,
            format!("tensor `{name}` has dtype {other:?}; checkpoints store F32 or F16"),
        )),
    }
}

/// The checkpoint as bytes; `extra` tensors (names under [`OPTIMIZER_PREFIX`]) are appended.
pub fn to_bytes(
    cfg: &Config,
    weights: &Weights,
    dtype: StorageDtype,
    extra: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<Vec<u8>, Error> {
    cfg.validate()?;
    let specs = cfg.tensor_specs();
    let tensors = weights.tensors();
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(specs.len());
    for ((name, shape), data) in specs.into_iter().zip(tensors) {
        let expected: usize = shape.iter().product();
        if data.len() != expected {
            return Err(Error::WeightsMismatch {
                name,
                got: data.len(),
                expected,
            });
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("weight `{name}`"),
                value: data[i],
                index: i,
            });
        }
        encoded.push((name, shape, encode(data, dtype)));
    }
    for (name, shape, data) in extra {
        if !name.starts_with(OPTIMIZER_PREFIX) {
            return Err(bad(
                "(extra tensors)",
                format!("`{name}` must start with `{OPTIMIZER_PREFIX}`"),
            ));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("optimiser tensor `{name}`"),
                value: data[i],
                index: i,
            });
        }
        // Optimiser state stays f32 whatever the weights' storage.
        encoded.push((name.clone(), shape.clone(), encode(data, StorageDtype::F32)));
    }
    let st_dtype = |name: &str| {
        if name.starts_with(OPTIMIZER_PREFIX) || dtype == StorageDtype::F32 {
            Dtype::F32
        } else {
            Dtype::F16
        }
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(st_dtype(name), shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad("(serialising)", format!("tensor `{name}`: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, &Some(config_metadata(cfg)))
        .map_err(|e| bad("(serialising)", format!("{e:?}")))
}

/// Writes a checkpoint file (atomically, see [`write_atomic`]).
pub fn save(
    path: impl AsRef<Path>,
    cfg: &Config,
    weights: &Weights,
    dtype: StorageDtype,
) -> Result<(), Error> {
    let bytes = to_bytes(cfg, weights, dtype, &[])?;
    write_atomic(path.as_ref(), &bytes)
}

/// Writes `bytes` to `path` so that a reader (or a crash) sees either the old file or the whole
/// new one, never a part: the bytes go to a temporary file in the same directory, which is
/// flushed to the disk and then renamed over `path` (the directory is synced after, where the
/// platform allows). On an error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let io = |source, p: &Path| Error::Io {
        path: p.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| {
            io(
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
                path,
            )
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e, path));
    }
    // The rename is durable once the directory is; not every platform can open one to sync.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The string metadata of the safetensors file at `path`, from its header alone (its first
/// 8 + n bytes; the tensors are not read), or `None` when the file is not a safetensors file.
pub fn read_metadata(path: &Path) -> Result<Option<HashMap<String, String>>, Error> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    if len < 8 || f.read_exact(&mut n).is_err() {
        return Ok(None);
    }
    let n = u64::from_le_bytes(n);
    // safetensors' own bound on a header.
    if n > 100_000_000 || n > len - 8 {
        return Ok(None);
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let parsed: Result<HashMap<String, serde_json::Value>, _> = serde_json::from_slice(&header);
    let Ok(parsed) = parsed else { return Ok(None) };
    let meta = parsed
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(meta))
}

/// Whether `path` holds a checkpoint of this format (judged from its header alone).
pub fn is_checkpoint(path: &Path) -> Result<bool, Error> {
    Ok(read_metadata(path)?.is_some_and(|m| m.get("format").map(String::as_str) == Some(FORMAT)))
}

/// A loaded checkpoint: the config, the weights as f32, and any optimiser tensors.
pub struct Checkpoint {
    /// Where it was read from (the `path` given to [`from_bytes`]), for error messages.
    pub source: String,
    pub config: Config,
    pub weights: Weights,
    /// (name, shape, values) of every tensor under [`OPTIMIZER_PREFIX`], sorted by name.
    pub optimizer: Vec<(String, Vec<usize>, Vec<f32>)>,
}

/// What is wrong with a file safetensors refuses, in words (its own error names the variant).
fn describe(e: &SafeTensorError) -> String {
    use SafeTensorError as S;
    match e {
        S::HeaderTooSmall => "shorter than the 8-byte header length (empty or truncated)".into(),
        S::InvalidHeaderLength => {
            "the header length points past the end of the file (truncated, or not a safetensors file)"
                .into()
        }
        S::HeaderTooLarge => "the header length is over 100 MB (not a safetensors file)".into(),
        S::InvalidHeader => "the header is not UTF-8 text".into(),
        S::InvalidHeaderStart => "the header does not start with `{` (not a safetensors file)".into(),
        S::InvalidHeaderDeserialization | S::JsonError(_) => {
            "the header is not the JSON a safetensors file holds".into()
        }
        S::MetadataIncompleteBuffer => {
            "the tensors the header lists do not cover the data exactly (truncated or padded)"
                .into()
        }
        S::ValidationOverflow => "a tensor's size in the header overflows".into(),
        S::TensorInvalidInfo => "a tensor's dtype and shape disagree with its byte range".into(),
        S::InvalidOffset(name) => format!("tensor `{name}` has a byte range out of order or out of bounds"),
        S::InvalidTensorView(dtype, shape, len) => {
            format!("a {dtype:?} tensor of shape {shape:?} cannot span {len} bytes")
        }
        S::TensorNotFound(name) => format!("tensor `{name}` is missing"),
        S::IoError(e) => e.to_string(),
    }
}

/// The values of tensor `name`, refused if one is NaN or infinite.
fn finite(path: &str, name: &str, values: Vec<f32>) -> Result<Vec<f32>, Error> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(values),
        Some(i) => Err(bad(
            path,
            format!(
                "tensor `{name}` holds {} at index {i}: the weights are corrupt or come from a run that diverged",
                values[i]
            ),
        )),
    }
}

/// Parses checkpoint bytes; `path` only names the source in errors.
///
/// Nothing is allocated from the metadata's word alone: the stored config's parameter count
/// is compared with the file's size, and every tensor's name, shape and dtype with the
/// config's, before the weights are decoded, so memory stays within a small multiple of the
/// file's size whatever the header says. Non-finite values are refused, naming the tensor.
pub fn from_bytes(path: &str, bytes: &[u8]) -> Result<Checkpoint, Error> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(
            path,
            format!("not a readable safetensors file: {}", describe(&e)),
        )
    })?;
    let metadata = meta
        .metadata()
        .clone()
        .ok_or_else(|| bad(path, "no metadata: the config is missing"))?;
    let config = config_from_metadata(path, &metadata)?;
    let params = config
        .checked_parameters()
        .expect("a validated config's parameter count does not overflow");
    if params.saturating_mul(2) > bytes.len() {
        return Err(bad(
            path,
            format!(
                "the stored config has {params} parameters, more than the {} bytes of the file can hold (2 bytes each as f16): truncated, or the config does not match the tensors",
                bytes.len()
            ),
        ));
    }
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(path, format!("truncated or corrupt: {}", describe(&e))))?;
    let specs = config.tensor_specs();
    let mut views = Vec::with_capacity(specs.len());
    for (name, shape) in &specs {
        let view = st.tensor(name).map_err(|_| {
            bad(
                path,
                format!("tensor `{name}` (shape {shape:?}) is missing"),
            )
        })?;
        if view.shape() != shape.as_slice() {
            return Err(bad(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, the config needs {shape:?}",
                    view.shape()
                ),
            ));
        }
        views.push(view);
    }
    // Every size is now the file's own: the weights take at most twice its bytes.
    let mut weights = Weights::zeros(&config);
    for (((name, _), view), dst) in specs.iter().zip(&views).zip(weights.tensors_mut()) {
        *dst = finite(path, name, decode(path, name, view)?)?;
    }
    let known: std::collections::HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
    let mut names: Vec<&String> = st.names();
    names.sort();
    let mut optimizer = Vec::new();
    for name in names {
        if name.starts_with(OPTIMIZER_PREFIX) {
            let view = st.tensor(name).expect("listed name");
            optimizer.push((
                name.clone(),
                view.shape().to_vec(),
                finite(path, name, decode(path, name, &view)?)?,
            ));
        } else if !known.contains(name.as_str()) {
            return Err(bad(
                path,
                format!("unexpected tensor `{name}`: the stored config has no such parameter"),
            ));
        }
    }
    Ok(Checkpoint {
        source: path.to_string(),
        config,
        weights,
        optimizer,
    })
}

/// Reads a checkpoint file.
pub fn load(path: impl AsRef<Path>) -> Result<Checkpoint, Error> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: shown.clone(),
        source,
    })?;
    from_bytes(&shown, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            tied_head: false,
            activation: Activation::Relu,
            ..Config::tiny()
        }
    }

    #[test]
    fn round_trip_f32_is_exact_and_f16_rounds_once() {
        let c = cfg();
        let w = Weights::random(&c, 3);
        let back = from_bytes("mem", &to_bytes(&c, &w, StorageDtype::F32, &[]).unwrap()).unwrap();
        assert_eq!(back.config, c);
        assert_eq!(back.weights, w);
        let half = from_bytes("mem", &to_bytes(&c, &w, StorageDtype::F16, &[]).unwrap()).unwrap();
        for (a, b) in w.tensors().iter().zip(half.weights.tensors()) {
            for (&x, &y) in a.iter().zip(b) {
                assert_eq!(y, half::f16::from_f32(x).to_f32());
            }
        }
    }

    #[test]
    fn optimizer_tensors_round_trip_and_others_are_rejected() {
        let c = Config::tiny();
        let w = Weights::random(&c, 4);
        let extra = vec![("optimizer.step".to_string(), vec![1], vec![7.0])];
        let back =
            from_bytes("mem", &to_bytes(&c, &w, StorageDtype::F16, &extra).unwrap()).unwrap();
        assert_eq!(back.optimizer, extra);
        let err = to_bytes(
            &c,
            &w,
            StorageDtype::F32,
            &[("m".into(), vec![1], vec![0.0])],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("must start with `optimizer.`"),
            "{err}"
        );
    }

    /// Rewrites one tensor of a valid checkpoint and returns the load error.
    fn load_error(
        edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>, Dtype)>),
        meta: Option<(&str, &str)>,
    ) -> String {
        let c = Config::tiny();
        let w = Weights::random(&c, 5);
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = c
            .tensor_specs()
            .into_iter()
            .zip(w.tensors())
            .map(|((n, s), d)| (n, s, encode(d, StorageDtype::F32), Dtype::F32))
            .collect();
        edit(&mut tensors);
        let mut m = config_metadata(&c);
        if let Some((k, v)) = meta {
            m.insert(k.into(), v.into());
        }
        let views: Vec<_> = tensors
            .iter()
            .map(|(n, s, b, d)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let bytes = safetensors::serialize(views, &Some(m)).unwrap();
        match from_bytes("ckpt", &bytes) {
            Ok(_) => "loaded".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn mismatches_name_the_first_bad_tensor() {
        assert_eq!(
            load_error(
                |t| {
                    t.remove(5);
                },
                None
            ),
            "checkpoint ckpt: tensor `global.blocks.0.attn.qkv.weight` (shape [64, 192]) is missing"
        );
        assert_eq!(
            load_error(|t| { t[0].1 = vec![128, 32]; }, None),
            "checkpoint ckpt: tensor `global.embed` has shape [128, 32], the config needs [256, 16]"
        );
        // A tensor stored as f16 among f32 ones is fine: storage is per tensor.
        assert_eq!(
            load_error(
                |t| {
                    let values: Vec<f32> = t[1]
                        .2
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    t[1].2 = encode(&values, StorageDtype::F16);
                    t[1].3 = Dtype::F16;
                },
                None
            ),
            "loaded"
        );
        assert_eq!(
            load_error(
                |t| {
                    t[2].3 = Dtype::I32;
                },
                None
            ),
            "checkpoint ckpt: tensor `global.pad` has dtype I32; checkpoints store F32 or F16"
        );
        assert_eq!(
            load_error(|t| t.push(("head.weight".into(), vec![1], vec![0; 4], Dtype::F32)), None),
            "checkpoint ckpt: unexpected tensor `head.weight`: the stored config has no such parameter"
        );
        assert_eq!(
            load_error(|_| {}, Some(("patch", "5"))),
            "checkpoint ckpt: stored config is invalid: config field `context` = 64: must be a multiple of `patch` = 5"
        );
        assert_eq!(
            load_error(|_| {}, Some(("format_version", "9"))),
            "checkpoint ckpt: metadata `format_version` is `9`; this build reads version 1"
        );
    }

    #[test]
    fn truncated_file_is_an_error() {
        let c = Config::tiny();
        let bytes = to_bytes(&c, &Weights::random(&c, 6), StorageDtype::F32, &[]).unwrap();
        let err = from_bytes("ckpt", &bytes[..bytes.len() - 10])
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("checkpoint ckpt: "), "{err}");
        let err = from_bytes("ckpt", &bytes[..5]).err().unwrap().to_string();
        assert!(err.contains("not a readable safetensors file"), "{err}");
    }
}
