//! The backend a command runs on (`--device`), and loading the model it runs.

use std::path::PathBuf;

use megabyte::checkpoint;
use megabyte::ops::cubecl::prelude::*;
use megabyte::ops::{try_client, FloatElement};
use megabyte::{Config, Error, Model, Weights};

use crate::args::*;

/// The config and weights named by the arguments.
pub(crate) fn load(
    checkpoint: Option<&PathBuf>,
    preset: Option<&str>,
    seed: u64,
) -> Result<(Config, Weights), Error> {
    match (checkpoint, preset) {
        (Some(path), _) => {
            let ckpt = checkpoint::load(path)?;
            Ok((ckpt.config, ckpt.weights))
        }
        (None, Some(name)) => {
            let cfg = Config::preset(name).expect("clap checked the preset name");
            eprintln!("note: preset `{name}` with untrained weights (seed {seed})");
            note_size(&cfg);
            let w = Weights::init(&cfg, seed);
            Ok((cfg, w))
        }
        (None, None) => Err(Error::Usage(
            "no model: give --checkpoint FILE or --preset NAME".into(),
        )),
    }
}

/// Says how much memory a model's weights take before they are made, when that is a lot (the
/// paper presets' run to gigabytes).
pub(crate) fn note_size(cfg: &Config) {
    let params = cfg.num_parameters();
    let gib = (params * 4) as f64 / (1u64 << 30) as f64;
    if gib >= 0.5 {
        eprintln!(
            "note: {params} parameters: {gib:.1} GiB of f32 weights in host memory, and as much again on the device (half in f16)"
        );
    }
}

/// Refuses `--dtype f16` where it cannot apply: the cpu reference computes in f32 only.
pub(crate) fn check_dtype(backend: &Backend, dtype: DtypeArg) -> Result<(), Error> {
    if matches!(backend, Backend::Cpu) && dtype != DtypeArg::F32 {
        return Err(Error::Usage(
            "--dtype f16 needs a kernel device (--device wgpu or cuda): the cpu reference computes in f32 only".into(),
        ));
    }
    Ok(())
}

/// The backend a command runs on, resolved from `--device`.
pub(crate) enum Backend {
    Cpu,
    #[cfg(feature = "wgpu")]
    Wgpu(ComputeClient<megabyte::ops::cubecl::wgpu::WgpuRuntime>),
    /// The client, and the device it opened as the driver reported it.
    #[cfg(feature = "cuda")]
    Cuda(
        ComputeClient<megabyte::ops::cubecl::cuda::CudaRuntime>,
        megabyte::cuda::CudaDevice,
    ),
    #[cfg(feature = "hip")]
    Hip(ComputeClient<megabyte::ops::cubecl::hip::HipRuntime>),
}

#[cfg(not(all(feature = "cuda", feature = "wgpu", feature = "hip")))]
pub(crate) fn not_built(name: &str) -> Error {
    Error::Usage(format!(
        "--device {name}: this build of megabyte has no `{name}` backend; rebuild with `--features {name}`"
    ))
}

pub(crate) fn backend(arg: DeviceArg) -> Result<Backend, Error> {
    let chosen = match arg {
        DeviceArg::Cpu => Backend::Cpu,
        DeviceArg::Cuda => {
            #[cfg(feature = "cuda")]
            {
                cuda_backend()?
            }
            #[cfg(not(feature = "cuda"))]
            return Err(not_built("cuda"));
        }
        DeviceArg::Hip => {
            #[cfg(feature = "hip")]
            {
                Backend::Hip(quietly(|| try_client(&Default::default()))?)
            }
            #[cfg(not(feature = "hip"))]
            return Err(not_built("hip"));
        }
        DeviceArg::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                Backend::Wgpu(try_client(&Default::default())?)
            }
            #[cfg(not(feature = "wgpu"))]
            return Err(not_built("wgpu"));
        }
        DeviceArg::Auto => auto_backend(),
    };
    let name = match &chosen {
        Backend::Cpu => "cpu (pure-Rust reference)".to_string(),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(c) => format!("wgpu ({})", adapter_name(c)),
        #[cfg(feature = "cuda")]
        Backend::Cuda(_, device) => device.to_string(),
        #[cfg(feature = "hip")]
        Backend::Hip(_) => "hip".to_string(),
    };
    eprintln!("device: {name}");
    Ok(chosen)
}

#[cfg(feature = "wgpu")]
pub(crate) fn adapter_name<R: Runtime>(client: &ComputeClient<R>) -> String {
    let hw = &client.properties().hardware;
    format!(
        "{} units per cube, {} KiB shared memory",
        hw.max_units_per_cube,
        hw.max_shared_memory_size / 1024
    )
}

/// The CUDA devices the driver reports (through cudarc), or a one-line error saying why there
/// are none: no driver library, a driver that does not start, no device.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_devices() -> Result<Vec<megabyte::cuda::CudaDevice>, Error> {
    megabyte::cuda::devices().map_err(|reason| {
        megabyte::ops::OpError::NoDevice {
            runtime: "cuda",
            reason,
        }
        .into()
    })
}

/// The default CUDA device, opened only once the driver has reported it.
#[cfg(feature = "cuda")]
fn cuda_backend() -> Result<Backend, Error> {
    let device = cuda_devices()?.swap_remove(0);
    Ok(Backend::Cuda(try_client(&Default::default())?, device))
}

/// Runs `f` with the panic hook silenced: the HIP and wgpu runtimes panic, printing their own
/// message, when no device answers, and `try_client` turns that panic into an error.
#[cfg(any(feature = "hip", feature = "wgpu"))]
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = f();
    std::panic::set_hook(hook);
    out
}

/// Tries the runtimes from fastest to slowest: CUDA where the driver reports a device, then
/// HIP, then wgpu, then the cpu reference.
pub(crate) fn auto_backend() -> Backend {
    let mut found = None;
    #[cfg(feature = "cuda")]
    if found.is_none() {
        found = cuda_backend().ok();
    }
    #[cfg(feature = "hip")]
    if found.is_none() {
        found = quietly(|| try_client(&Default::default()))
            .ok()
            .map(Backend::Hip);
    }
    #[cfg(feature = "wgpu")]
    if found.is_none() {
        found = quietly(|| try_client(&Default::default()))
            .ok()
            .map(Backend::Wgpu);
    }
    found.unwrap_or(Backend::Cpu)
}

/// What a subcommand does with the model on a kernel device, written once for every runtime
/// and element type ([`with_model`] picks them).
pub(crate) trait WithModel {
    type Output;
    fn run<R: Runtime, E: FloatElement>(self, model: &Model<R, E>) -> Result<Self::Output, Error>;
}

/// Builds the model on `backend` with `dtype` storage and runs `job` on it: the one dispatch
/// over backends and element types. The cpu backend has no device model (the caller runs the
/// reference instead).
pub(crate) fn with_model<J: WithModel>(
    backend: &Backend,
    dtype: DtypeArg,
    cfg: &Config,
    w: &Weights,
    job: J,
) -> Result<J::Output, Error> {
    fn typed<R: Runtime, J: WithModel>(
        client: &ComputeClient<R>,
        dtype: DtypeArg,
        cfg: &Config,
        w: &Weights,
        job: J,
    ) -> Result<J::Output, Error> {
        match dtype {
            DtypeArg::F32 => job.run(&Model::<R, f32>::new(client, cfg, w)?),
            DtypeArg::F16 => job.run(&Model::<R, half::f16>::new(client, cfg, w)?),
        }
    }
    match backend {
        Backend::Cpu => Err(Error::Usage("the cpu backend has no device model".into())),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(c) => typed(c, dtype, cfg, w, job),
        #[cfg(feature = "cuda")]
        Backend::Cuda(c, _) => typed(c, dtype, cfg, w, job),
        #[cfg(feature = "hip")]
        Backend::Hip(c) => typed(c, dtype, cfg, w, job),
    }
}
